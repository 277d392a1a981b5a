"""Batched embedding: out-of-memory back-off, precision and memory-format options give the same vectors."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from clipopt_core.models.encode import MicroBatcher, autocast, default_workers, embed_images, embed_texts
from clipopt_core.models.loading import ModelSpec, load_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def uris(shapes_source: Path) -> list[str]:
    manifest = pl.read_csv(shapes_source / "manifest.csv")
    return [str(shapes_source / path) for path in manifest["path"].to_list()][:20]


class OomAbove:
    """Wraps a callable: raises torch.OutOfMemoryError for inputs of more than ``limit`` rows; logs sizes."""

    def __init__(self, fn, limit: int) -> None:
        self.fn, self.limit, self.sizes = fn, limit, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(batch))
        if len(batch) > self.limit:
            raise torch.OutOfMemoryError(f"fake: {len(batch)} rows > {self.limit}")
        return self.fn(batch)


def test_micro_batcher_halves_on_oom_and_keeps_the_size_that_fits():
    batch = torch.arange(20.0).view(10, 2)
    fn = OomAbove(lambda x: x * 2, limit=3)
    batcher = MicroBatcher(8)
    assert torch.equal(batcher(fn, batch), batch * 2)
    assert batcher.size == 2 and fn.sizes[:3] == [8, 4, 2]  # 8 and 4 failed, 2 fits
    assert torch.equal(batcher(fn, batch[:5]), batch[:5] * 2) and max(fn.sizes[-3:]) == 2  # never grows back
    with pytest.raises(torch.OutOfMemoryError):
        MicroBatcher(4)(OomAbove(lambda x: x, limit=0), batch)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        MicroBatcher(0)


def test_embed_images_backs_off_when_the_model_runs_out_of_memory(bundle, uris, monkeypatch):
    reference = embed_images(bundle, uris, batch_size=4)
    limited = OomAbove(bundle.model.encode_image, limit=5)
    monkeypatch.setattr(bundle.model, "encode_image", limited)
    vectors = embed_images(bundle, uris, batch_size=16)
    torch.testing.assert_close(vectors, reference, rtol=0, atol=1e-5)
    assert 16 in limited.sizes and max(size for size in limited.sizes[2:]) <= 5  # backed off to 4 after two OOMs


def test_precision_and_channels_last_options(bundle, uris):
    fp32 = embed_images(bundle, uris, precision="fp32")
    bf16 = embed_images(bundle, uris, precision="bf16")  # autocast on CPU too when asked for explicitly
    assert not torch.equal(fp32, bf16)
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.98
    torch.testing.assert_close(embed_images(bundle, uris, channels_last=True), fp32, rtol=0, atol=1e-5)
    torch.testing.assert_close(embed_images(bundle, uris, batch_size="auto"), fp32, rtol=0, atol=1e-5)
    texts = ["a red circle", "a blue square", "two green triangles"]
    torch.testing.assert_close(embed_texts(bundle, texts, batch_size=1), embed_texts(bundle, texts), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [({"precision": "int8"}, "precision must be one of"),
                                             ({"batch_size": 0}, "batch_size must be a positive integer"),
                                             ({"batch_size": "big"}, "batch_size must be a positive integer")])
def test_bad_options_are_refused(bundle, uris, kwargs, message):
    with pytest.raises(ValueError, match=message):
        embed_images(bundle, uris[:2], **kwargs)


def test_auto_precision_is_fp32_on_cpu():
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_default_workers_decode_in_parallel_only_for_a_gpu():
    assert default_workers(torch.device("cpu"), cpus=16) == 0  # workers would steal the model's cores
    assert default_workers(torch.device("cuda"), cpus=16) == 8
    assert default_workers(torch.device("cuda"), cpus=3) == 2
    assert default_workers(torch.device("cuda"), cpus=1) == 0
