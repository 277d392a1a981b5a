"""The realignment embedding cache: same content as the in-memory path, reused per tower, rebuilt on changed inputs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from clipopt_core.models.encode import embed_images
from clipopt_core.models.loading import ClipBundle, ModelSpec, load_model
from clipopt_core.train import embedding_cache
from clipopt_core.train.config import RealignConfig, TrainConfig
from clipopt_core.train.embedding_cache import realign_pair_cache
from clipopt_core.train.loop import fit
from clipopt_core.train.tasks import InMemoryPairs, RealignTask


def bundle(cache_dir: Path) -> ClipBundle:
    torch.manual_seed(1234)
    return load_model(ModelSpec("clipopt-tiny"), cache_dir=cache_dir)


def reference_grouping(image_embeddings: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The in-memory grouping realignment used before the cache: per distinct caption (first-seen order),
    the renormalised mean of its images' embeddings."""
    groups: dict[str, list[int]] = {}
    for row, caption in enumerate(captions):
        groups.setdefault(caption, []).append(row)
    texts = list(groups)
    return F.normalize(torch.stack([image_embeddings[groups[t]].mean(dim=0) for t in texts]), dim=-1), texts


@pytest.fixture(scope="module")
def pairs(caption_source: Path) -> pl.DataFrame:
    """24 caption pairs + 6 more that repeat earlier captions on other images (grouped by text)."""
    frame = pl.read_csv(caption_source / "manifest.csv")
    frame = pl.concat([frame, frame.head(6).with_columns(pl.col("caption").reverse())])
    paths = [caption_source / p for p in frame["path"]]
    return frame.select(pl.Series("uri", [str(p) for p in paths]), "caption",
                        pl.Series("sha256", [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]))


def test_cache_holds_the_in_memory_grouping_and_reads_any_rows(pairs: pl.DataFrame, tmp_path: Path) -> None:
    model = bundle(tmp_path)
    cached = realign_pair_cache(model, pairs, tmp_path, shard_rows=4)  # 24 distinct captions in 6 shards
    expected, texts = reference_grouping(embed_images(model, pairs["uri"].to_list()), pairs["caption"].to_list())
    assert len(cached) == len(texts) == 24 and len(list(cached.folder.glob("embeddings-*.npy"))) == 6
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    embeddings, captions = cached.take(order)
    torch.testing.assert_close(embeddings, expected[order], atol=1e-6, rtol=1e-5)
    assert captions == [texts[i] for i in order.tolist()]
    assert not list(tmp_path.glob("**/raw")) and not list(tmp_path.glob("**/*.tmp-*"))


def test_same_tower_and_pairs_reuse_the_entry_without_embedding(pairs: pl.DataFrame, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = bundle(tmp_path)
    first = realign_pair_cache(model, pairs, tmp_path)

    def no_embedding(*args, **kwargs):
        raise AssertionError("a cached entry was embedded again")

    monkeypatch.setattr(embedding_cache, "embed_images", no_embedding)
    assert realign_pair_cache(bundle(tmp_path), pairs, tmp_path) == first
    with torch.no_grad():  # the text tower is not part of the key: realignment trains it, images stay put
        model.model.token_embedding.weight.add_(0.5)
    assert realign_pair_cache(model, pairs, tmp_path) == first


def test_changed_tower_weights_or_pairs_rebuild(pairs: pl.DataFrame, tmp_path: Path) -> None:
    model = bundle(tmp_path)
    first = realign_pair_cache(model, pairs, tmp_path)
    before, _ = first.take(torch.arange(len(first)))

    recaptioned = pairs.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("an edited caption"))
                                     .otherwise(pl.col("caption")).alias("caption"))
    assert realign_pair_cache(model, recaptioned, tmp_path).folder != first.folder
    new_bytes = pairs.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("0" * 64))
                                   .otherwise(pl.col("sha256")).alias("sha256"))  # one image's content changed
    assert realign_pair_cache(model, new_bytes, tmp_path).folder != first.folder

    with torch.no_grad():  # another image tower (e.g. the MCIP encoder instead of stage 1)
        next(model.model.visual.parameters()).mul_(1.5)
    other = realign_pair_cache(model, pairs, tmp_path)
    after, _ = other.take(torch.arange(len(other)))
    assert other.folder != first.folder and not torch.allclose(before, after)
    assert len(list((tmp_path / embedding_cache.CACHE_FOLDER).iterdir())) == 4


def test_training_from_the_cache_equals_training_in_memory(pairs: pl.DataFrame, tmp_path: Path) -> None:
    """Same batches, same steps, same weights (up to float noise) as the in-memory realignment."""
    train = TrainConfig(epochs=2, batch_size=8, lr=1e-3, lr_floor=0.0, weight_decay=0.2, betas=(0.9, 0.98),
                        eps=1e-6, precision="fp32", eval_every_steps=100, validate_at_start=False, grad_clip=None)
    config = RealignConfig(train=train)
    model = bundle(tmp_path)
    expected, texts = reference_grouping(embed_images(model, pairs["uri"].to_list()), pairs["caption"].to_list())
    cached = realign_pair_cache(model, pairs, tmp_path, shard_rows=5)

    memory_task = RealignTask(bundle(tmp_path), expected, texts, config, lambda b: 0.0)
    cache_task = RealignTask(bundle(tmp_path), cached, None, config, lambda b: 0.0)
    assert isinstance(memory_task.pairs, InMemoryPairs) and memory_task.steps_per_epoch(train) == 3
    for (a_images, a_texts), (b_images, b_texts) in zip(memory_task.batches(train, 1, 0), cache_task.batches(train, 1, 0)):
        assert a_texts == b_texts
        torch.testing.assert_close(a_images, b_images, atol=1e-6, rtol=1e-5)
    start = {key: value.clone() for key, value in memory_task.modules.state_dict().items()}
    fit(memory_task, train, tmp_path / "memory")
    fit(cache_task, train, tmp_path / "cache")
    trained = memory_task.modules.state_dict()
    assert any(not torch.equal(start[key], trained[key]) for key in start)  # training moved the text tail
    for key, value in trained.items():  # AdamW's normalised steps turn 1e-7 input noise into ~1e-5 here
        torch.testing.assert_close(cache_task.modules.state_dict()[key], value, atol=1e-4, rtol=1e-3)


def test_pair_rows_come_with_their_captions(tmp_path: Path, pairs: pl.DataFrame) -> None:
    cached = realign_pair_cache(bundle(tmp_path), pairs, tmp_path)
    with pytest.raises(ValueError, match="captions=None"):
        RealignTask(bundle(tmp_path), cached, ["a"], RealignConfig(), lambda b: 0.0)
    with pytest.raises(ValueError, match="no pairs"):
        realign_pair_cache(bundle(tmp_path), pairs.head(0), tmp_path)


def test_a_parquet_scan_builds_the_same_entry_slice_by_slice(pairs: pl.DataFrame, tmp_path: Path) -> None:
    """The streamed build (lazy scan, many slices and caption buckets, a caption on more images than a
    slice holds) keeps the in-memory grouping: first-seen order, renormalised means."""
    repeated = pl.concat([pairs, pairs.head(9).with_columns(pl.lit("one caption on nine images").alias("caption")),
                          pairs.slice(3, 4)])
    repeated.write_parquet(tmp_path / "pairs.parquet")
    model = bundle(tmp_path)
    scanned = realign_pair_cache(model, pl.scan_parquet(tmp_path / "pairs.parquet"), tmp_path / "a", shard_rows=4)
    assert scanned.pairs == repeated.height == 43
    expected, texts = reference_grouping(embed_images(model, repeated["uri"].to_list()), repeated["caption"].to_list())
    embeddings, captions = scanned.take(torch.arange(len(scanned)))
    assert captions == texts and len(texts) == 25
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=1e-5)
    eager = realign_pair_cache(model, repeated, tmp_path / "b", shard_rows=4)
    assert eager.folder.name == scanned.folder.name  # one key for the same content, lazy or not
