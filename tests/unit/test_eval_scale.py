"""Bounded evaluation and validation (issue 15): the validation subset, the query sample, zero-shot classes in
chunks, the bounded embedding cache, what evaluate_variants keeps per variant, the gallery from kept
neighbours, and the bounded decode cache of ImageDataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from clipopt_core.data import datasets
from clipopt_core.data.datasets import ImageDataset, decoded_bytes
from clipopt_core.data.manifest import ingest, scan_source, split_by_class
from clipopt_core.evaluate import protocol, variants
from clipopt_core.evaluate.metrics import nearest_neighbours
from clipopt_core.evaluate.protocol import (EmbeddingCache, EvalConfig, EvalResult, class_embeddings, evaluate_model,
                                            gallery_rows, query_sample, validation_map, validation_subset)
from clipopt_core.evaluate.report import gallery_image, neighbour_gallery_image
from clipopt_core.models.encode import zero_shot_classifier
from clipopt_core.models.loading import ModelSpec, load_model


def labelled(sizes: list[int]) -> pl.DataFrame:
    """A split with class ``c<i>`` holding ``sizes[i]`` images, rows interleaved across classes."""
    labels = [f"c{i}" for i, size in enumerate(sizes) for _ in range(size)]
    order = np.random.default_rng(0).permutation(len(labels))
    return pl.DataFrame({"uri": [f"mem://{i}" for i in range(len(labels))], "label": [labels[i] for i in order]})


# ---------------------------------------------------------------- validation subset

def test_a_small_validation_split_is_used_whole() -> None:
    split = labelled([3, 4, 5])
    assert validation_subset(split, 2000).equals(split) and validation_subset(split, None).equals(split)
    assert validation_subset(split, 12).equals(split)


def test_the_validation_subset_is_whole_classes_bounded_fixed_and_seeded() -> None:
    split = labelled([int(s) for s in np.random.default_rng(1).integers(1, 30, 200)])
    subset = validation_subset(split, 500, seed=3)
    assert 470 <= subset.height <= 500  # filled up to the budget with classes of <= 29 images
    counts = dict(split.group_by("label").len().iter_rows())
    assert all(counts[label] == n for label, n in subset.group_by("label").len().iter_rows())  # whole classes
    assert subset.equals(validation_subset(split, 500, seed=3))  # the same images at every evaluation
    assert set(subset["uri"]) != set(validation_subset(split, 500, seed=4)["uri"])
    positions = {uri: i for i, uri in enumerate(split["uri"])}
    assert [positions[u] for u in subset["uri"]] == sorted(positions[u] for u in subset["uri"])  # split order
    bigger = labelled([int(s) for s in np.random.default_rng(1).integers(1, 30, 2000)])
    assert validation_subset(bigger, 500, seed=3).height <= 500  # bounded whatever the split's size
    assert validation_subset(labelled([40, 50]), 10).height == 10  # every class too big: one class, cut
    with pytest.raises(ValueError, match="val_max_images"):
        validation_subset(split, 0)


def test_validation_map_embeds_only_the_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    embedded: list[int] = []

    def fake_embed(bundle, uris, **kwargs) -> torch.Tensor:
        embedded.append(len(uris))
        return torch.nn.functional.normalize(torch.randn(len(uris), 8), dim=1)

    monkeypatch.setattr(protocol, "embed_images", fake_embed)
    split = labelled([5] * 100)
    score = validation_map(split, max_images=60, seed=0)
    assert 0.0 < score(None) <= 1.0 and 0.0 < score(None) <= 1.0
    assert embedded == [60, 60]
    validation_map(split)(None)
    assert embedded[-1] == 500  # without a budget: the whole split


# ---------------------------------------------------------------- query sample, zero-shot chunks, caches

def test_query_sample_is_seeded_sorted_and_off_by_default() -> None:
    assert query_sample(100, None, 0) is None and query_sample(100, 100, 0) is None
    sample = query_sample(1000, 50, 7)
    assert sample.shape == (50,) and torch.equal(sample, sample.sort().values) and len(set(sample.tolist())) == 50
    assert torch.equal(sample, query_sample(1000, 50, 7)) and not torch.equal(sample, query_sample(1000, 50, 8))
    with pytest.raises(ValueError, match="max_image_queries"):
        query_sample(10, 0, 0)


def test_zero_shot_classes_in_chunks_equal_all_at_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path)
    names, templates = [f"class {i}" for i in range(7)], ("a photo of a {}.", "{}", "art of a {}")
    whole = zero_shot_classifier(bundle, names, templates)
    for chunk in (1, 3, 7, 100):
        torch.testing.assert_close(class_embeddings(bundle, names, templates, chunk=chunk), whole, rtol=0, atol=1e-6)


def test_embedding_cache_is_bounded_least_recently_used_first() -> None:
    cache = EmbeddingCache(max_bytes=3 * 400)  # three [10, 10] float32 tensors
    computed: list[str] = []

    def tensor(name: str):
        return lambda: computed.append(name) or torch.zeros(10, 10)

    for name in ("a", "b", "c"):
        cache.get(("t", name), tensor(name))
    cache.get(("t", "a"), tensor("a"))  # a is now the most recently used
    cache.get(("t", "d"), tensor("d"))  # evicts b
    assert cache.nbytes == 1200 and computed == ["a", "b", "c", "d"]
    cache.get(("t", "a"), tensor("a"))
    cache.get(("t", "b"), tensor("b"))
    assert computed == ["a", "b", "c", "d", "b"]
    huge = cache.get(("t", "huge"), lambda: torch.zeros(100, 100))
    assert huge.shape == (100, 100) and cache.nbytes == 0  # returned, not kept (and it pushed the rest out)


def test_evaluate_variants_keeps_scores_and_neighbours_not_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    caches: list[EmbeddingCache] = []

    def fake_evaluate(bundle, test, config, *, caption_pairs, cache, device):
        caches.append(cache)
        return EvalResult({"i2i_map": 0.5}, torch.ones(1000, 64), i2i_examples={0: [1, 2]})

    monkeypatch.setattr(variants, "variant_spec", lambda *args: None)
    monkeypatch.setattr(variants, "load_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(variants, "evaluate_model", fake_evaluate)
    config = EvalConfig(embedding_cache_bytes=12345)
    results = variants.evaluate_variants(None, ["baseline", "stage1", "2sft"], pl.DataFrame(), pl.DataFrame(), config,
                                         cache_dir=Path("."))
    assert all(r.image_embeddings is None and r.i2i_examples == {0: [1, 2]} for r in results.values())
    assert len({id(c) for c in caches}) == 1 and caches[0].max_bytes == 12345  # one shared, bounded cache


# ---------------------------------------------------------------- evaluate_model: sample and gallery neighbours

@pytest.fixture(scope="module")
def test_split(shapes_source: Path) -> pl.DataFrame:
    rows = ingest(str(shapes_source), scan_source(str(shapes_source))).accepted
    return split_by_class(rows, val_fraction=0.2, test_fraction=0.4, seed=0).filter(pl.col("split") == "test")


def test_evaluate_model_keeps_the_gallery_neighbours_and_samples_queries(test_split: pl.DataFrame,
                                                                         tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path)
    config = EvalConfig(templates=("{}",), batch_size=8, class_chunk=2)
    cache = EmbeddingCache()
    full = evaluate_model(bundle, test_split, config, cache=cache)
    rows = gallery_rows(test_split.height, 3)
    assert rows == [0, (test_split.height - 1) // 2, test_split.height - 1]
    want = nearest_neighbours(full.image_embeddings, torch.tensor(rows), 5).tolist()
    assert full.i2i_examples == dict(zip(rows, want)) and all(len(v) == 5 for v in want)
    sampled = evaluate_model(bundle, test_split, EvalConfig(templates=("{}",), batch_size=8, max_image_queries=5),
                             cache=cache)
    queries = query_sample(test_split.height, 5, 0).numpy()
    for name in ("i2i_map", "i2i_r1", "knn_top1"):
        scores = sampled.per_query[name]
        assert np.isnan(np.delete(scores, queries)).all(), name
        np.testing.assert_array_equal(scores[queries], full.per_query[name][queries])
    np.testing.assert_array_equal(sampled.per_query["zs_top1"], full.per_query["zs_top1"])  # not sampled


def test_gallery_from_kept_neighbours_equals_the_gallery_from_embeddings(tmp_path: Path) -> None:
    uris = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(path)
        uris.append(str(path))
    embeddings = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    neighbours = dict(zip([0, 3], nearest_neighbours(embeddings, torch.tensor([0, 3]), 2).tolist()))
    from_embeddings = gallery_image(uris, {"baseline": embeddings, "mcip": embeddings.flip(0)}, [0, 3], top_k=2, thumb=8)
    flipped = dict(zip([0, 3], nearest_neighbours(embeddings.flip(0), torch.tensor([0, 3]), 2).tolist()))
    kept = neighbour_gallery_image(uris, {"baseline": neighbours, "mcip": flipped}, thumb=8)
    assert kept == from_embeddings
    assert neighbour_gallery_image(uris, {"baseline": neighbours, "mcip": neighbours}, thumb=8) != kept


def test_nearest_neighbours_follow_the_stable_sort_with_ties() -> None:
    x = torch.nn.functional.normalize(torch.randint(0, 3, (40, 3)).float() + 0.1, dim=1)  # many duplicates
    queries = torch.tensor([0, 7, 39])
    sims = x[queries] @ x.T
    sims[torch.arange(3), queries] = float("-inf")
    want = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :6]
    assert torch.equal(nearest_neighbours(x, queries, 6, chunk_size=2), want)


# ---------------------------------------------------------------- decode cache

@pytest.fixture()
def small_images(tmp_path: Path) -> list[str]:
    uris = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (10, 10), (i * 30, 0, 0)).save(path)  # 300 bytes of pixels each
        uris.append(str(path))
    return uris


def counting_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loads: list[str] = []
    real = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda uri: loads.append(uri) or real(uri))
    return loads


def test_decode_cache_keeps_at_most_its_budget(small_images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    loads = counting_loads(monkeypatch)
    dataset = ImageDataset(small_images, [0] * 6, lambda image: image, cache_bytes=700)
    assert decoded_bytes(dataset.image(0)) == 300
    for _ in range(3):
        for index in range(6):
            dataset[index]
    assert (dataset.cached_items, dataset.cached_bytes) == (2, 600)  # the first two read; a third would pass 700
    assert len(loads) == 2 + 3 * 4 and loads.count(small_images[0]) == 1 and loads.count(small_images[5]) == 3


def test_decode_cache_holds_a_set_that_fits_and_nothing_when_off(small_images: list[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    loads = counting_loads(monkeypatch)
    dataset = ImageDataset(small_images, [0] * 6, lambda image: image)  # the default budget: 1 GiB
    for _ in range(2):
        for index in range(6):
            dataset[index]
    assert (dataset.cached_items, dataset.cached_bytes, len(loads)) == (6, 1800, 6)
    off = ImageDataset(small_images, [0] * 6, lambda image: image, cache_decoded=False)
    for index in range(6):
        off[index]
    assert (off.cached_items, len(loads)) == (0, 12)
    with pytest.raises(ValueError, match="cache_bytes"):
        ImageDataset(small_images, [0] * 6, lambda image: image, cache_bytes=-1)


def test_val_max_images_is_a_checked_stage_setting() -> None:
    from clipopt_core.train.schema import flat_defaults, stage_config

    assert flat_defaults("retrieval")["val_max_images"] == 2000 and flat_defaults("mcip")["val_max_images"] == 2000
    assert stage_config("retrieval", {"val_max_images": None}).val_max_images is None
    assert stage_config("mcip", {"val_max_images": 500}).val_max_images == 500
    with pytest.raises(ValueError, match="val_max_images"):
        stage_config("retrieval", {"val_max_images": 0})
    assert flat_defaults("realign")["val_max_pairs"] == 25_000
    with pytest.raises(ValueError, match="val_max_pairs"):
        stage_config("realign", {"val_max_pairs": 0})


def test_realignment_validation_keeps_whole_images_within_its_pair_budget() -> None:
    """Caption pairs are subset by image: every caption of a kept image, bounded, seeded, the same every time."""
    rng = np.random.default_rng(2)
    pairs = pl.DataFrame([(f"/v/{image}.png", f"caption {image}-{c}") for image in range(300)
                          for c in range(int(rng.integers(1, 8)))], schema=["uri", "caption"], orient="row")
    subset = validation_subset(pairs, 400, seed=5, by="uri")
    assert 390 <= subset.height <= 400
    per_image = dict(pairs.group_by("uri").len().iter_rows())
    assert all(per_image[uri] == n for uri, n in subset.group_by("uri").len().iter_rows())  # whole images
    assert subset.equals(validation_subset(pairs, 400, seed=5, by="uri"))
    assert set(subset["uri"]) != set(validation_subset(pairs, 400, seed=6, by="uri")["uri"])
    assert validation_subset(pairs, None, by="uri").equals(pairs)
