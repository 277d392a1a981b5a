"""Unit tests for the artifact store (clipopt_core.runtime.storage), pseudo-caption mining
(clipopt_core.train.mining) and the evaluation protocol (clipopt_core.evaluate.protocol)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from clipopt_core.data.captions import dedupe_texts
from clipopt_core.train.config import MiningConfig
from clipopt_core.train.mining import caption_stats, mine_pseudo_captions, similarity_histogram, top_k_chunked
from clipopt_core.evaluate.protocol import METRIC_COLUMNS, EmbeddingCache, EvalConfig, caption_benchmark, evaluate_model
from clipopt_core.data.manifest import ingest, scan_source, split_by_class
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore, StorageError


# ------------------------------------------------------------------ ArtifactStore

@pytest.fixture()
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(f"file://{tmp_path / 'artifacts'}")


def test_bytes_json_parquet_round_trip(store: ArtifactStore, tmp_path: Path):
    data = bytes(range(256)) * 10
    assert store.write_bytes("a/b/blob.bin", data) == hashlib.sha256(data).hexdigest()
    assert store.read_bytes("a/b/blob.bin") == data
    assert (tmp_path / "artifacts/a/b/blob.bin").read_bytes() == data  # really under the base folder
    assert store.url("a/b/blob.bin") == f"file://{tmp_path}/artifacts/a/b/blob.bin"

    payload = {"metrics": {"i2i_map": 0.5}, "steps": [1, 2, 3], "name": "stage1"}
    store.write_json("reports/run.json", payload)
    assert store.read_json("reports/run.json") == payload

    frame = pl.DataFrame({"image_id": ["x", "y"], "rank": [0, 1], "similarity": [0.5, 0.25]},
                         schema={"image_id": pl.String, "rank": pl.Int32, "similarity": pl.Float32})
    store.write_parquet("captions/pseudo.parquet", frame)
    assert store.read_parquet("captions/pseudo.parquet").equals(frame)

    store.write_bytes("a/b/blob.bin", b"replaced")  # overwrite publishes the new bytes
    assert store.read_bytes("a/b/blob.bin") == b"replaced"
    assert store.exists("a/b/blob.bin") and not store.exists("a/b/other.bin")
    assert store.list_temp_objects() == []


def test_missing_key_is_a_storage_error(store: ArtifactStore):
    with pytest.raises(StorageError, match="not found"):
        store.read_bytes("nope.bin")


def test_plain_local_path_works(tmp_path: Path):
    store = ArtifactStore(str(tmp_path / "plain"))
    store.write_json("x.json", [1])
    assert store.read_json("x.json") == [1] and (tmp_path / "plain/x.json").is_file()


def test_list_temp_objects_finds_leftovers(store: ArtifactStore, tmp_path: Path):
    (tmp_path / "artifacts/models").mkdir(parents=True)
    (tmp_path / "artifacts/models/w.safetensors.tmp-abc").write_bytes(b"half")
    assert [Path(p).name for p in store.list_temp_objects()] == ["w.safetensors.tmp-abc"]
    assert store.list_temp_objects("reports") == []


def _checkpoint_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "open_clip_model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (root / "open_clip_config.json").write_text('{"embed_dim": 32}')
    (root / "sub" / "notes.txt").write_text("nested file")
    return root


def test_put_dir_get_dir_round_trip(store: ArtifactStore, tmp_path: Path):
    local = _checkpoint_folder(tmp_path / "local")
    hashes = store.put_dir(local, "models/stage1")
    expected = {p.relative_to(local).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in local.rglob("*") if p.is_file()}
    assert hashes == expected and set(hashes) == {"open_clip_model.safetensors", "open_clip_config.json", "sub/notes.txt"}
    assert store.read_json(f"models/stage1/{COMPLETE_MARKER}") == {"files": expected}
    assert store.list_temp_objects() == []

    out = store.get_dir("models/stage1", tmp_path / "download")
    for relative in expected:
        assert (out / relative).read_bytes() == (local / relative).read_bytes()
    assert json.loads((out / COMPLETE_MARKER).read_text()) == {"files": expected}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the staging folder was swapped in

    # already there with the same hashes: not downloaded again (a local edit survives)
    (out / "sub" / "notes.txt").write_text("local edit")
    store.get_dir("models/stage1", out)
    assert (out / "sub" / "notes.txt").read_text() == "local edit"


def test_get_dir_refuses_unsealed_folder(store: ArtifactStore, tmp_path: Path):
    store.write_bytes("models/half/open_clip_model.safetensors", b"partial")  # files but no marker
    with pytest.raises(StorageError, match=f"not a complete artifact \\(no {COMPLETE_MARKER}\\)"):
        store.get_dir("models/half", tmp_path / "download")
    assert not (tmp_path / "download").exists()


def test_get_dir_detects_tampered_file(store: ArtifactStore, tmp_path: Path):
    local = _checkpoint_folder(tmp_path / "local")
    store.put_dir(local, "models/stage1")
    (tmp_path / "artifacts/models/stage1/open_clip_config.json").write_text('{"embed_dim": 64}')
    with pytest.raises(StorageError, match="hash differs"):
        store.get_dir("models/stage1", tmp_path / "download")
    assert not (tmp_path / "download").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the staging copy is cleaned up


def test_put_dir_reseals_a_replaced_folder(store: ArtifactStore, tmp_path: Path):
    local = _checkpoint_folder(tmp_path / "local")
    store.put_dir(local, "models/stage1")
    (local / "open_clip_config.json").write_text('{"embed_dim": 16}')
    hashes = store.put_dir(local, "models/stage1")
    assert store.read_json(f"models/stage1/{COMPLETE_MARKER}")["files"] == hashes
    out = store.get_dir("models/stage1", tmp_path / "download")
    assert (out / "open_clip_config.json").read_text() == '{"embed_dim": 16}'


# ------------------------------------------------------------------ top-k and mining

@pytest.mark.parametrize("chunk, image_chunk", [(1, 4096), (3, 2), (7, 1), (10_000, 4)])
def test_top_k_chunked_matches_full_topk(chunk: int, image_chunk: int):
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(9, 16, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(50, 16, generator=generator), dim=-1)
    scores, ids = top_k_chunked(images, texts, 5, chunk_size=chunk, image_chunk_size=image_chunk)
    full_scores, full_ids = (images @ texts.T).topk(5, dim=1)
    assert torch.equal(ids, full_ids)
    torch.testing.assert_close(scores, full_scores, rtol=0, atol=1e-6)
    # k larger than the pool: every text, sorted
    scores, ids = top_k_chunked(images, texts[:4], 20, chunk_size=chunk, image_chunk_size=image_chunk)
    assert ids.shape == (9, 4)
    assert torch.equal(ids, (images @ texts[:4].T).argsort(dim=1, descending=True))


def unit(*degrees: float) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# images at 0, 90 and 200 degrees; captions at 0, 30, 60 and 80 degrees.
# cosines: image A (0):   1.000, 0.866, 0.500, 0.174
#          image B (90):  0.000, 0.500, 0.866, 0.985
#          image C (200): -0.940, -0.985, -0.766, -0.500   (never above any positive threshold)
IMAGES = unit(0, 90, 200)
POOL = ["t0", "t30", "t60", "t80"]
TEXTS = unit(0, 30, 60, 80)


def _captions(table: pl.DataFrame) -> dict[str, list[str]]:
    return {image: table.filter(pl.col("image_id") == image).sort("rank")["caption"].to_list()
            for image in table["image_id"].unique().to_list()}


def test_mining_fixed_threshold_hand_computed():
    table, threshold = mine_pseudo_captions(["A", "B", "C"], IMAGES, POOL, TEXTS, MiningConfig(top_k=20, threshold=0.6))
    assert threshold == 0.6
    assert table.columns == ["image_id", "rank", "caption", "similarity"]
    assert _captions(table) == {"A": ["t0", "t30"], "B": ["t80", "t60"]}  # C gets no rows at all
    sims = dict(zip(zip(table["image_id"], table["caption"]), table["similarity"]))
    assert sims[("A", "t30")] == pytest.approx(math.cos(math.radians(30)), abs=1e-6)
    assert sims[("B", "t80")] == pytest.approx(math.cos(math.radians(10)), abs=1e-6)
    assert table.filter(pl.col("image_id") == "B")["rank"].to_list() == [0, 1]

    table, _ = mine_pseudo_captions(["A", "B", "C"], IMAGES, POOL, TEXTS, MiningConfig(top_k=1, threshold=0.6))
    assert _captions(table) == {"A": ["t0"], "B": ["t80"]}  # top_k caps the count
    table, _ = mine_pseudo_captions(["A", "B", "C"], IMAGES, POOL, TEXTS, MiningConfig(top_k=20, threshold=0.4))
    assert _captions(table) == {"A": ["t0", "t30", "t60"], "B": ["t80", "t60", "t30"]}

    stats = caption_stats(table, 3, 0.4)
    assert stats["captions_per_image"] == pytest.approx(6 / 3)
    assert stats["images_without_captions"] == 1 and stats["share_without_captions"] == pytest.approx(1 / 3)
    assert stats["similarity_max"] == pytest.approx(1.0, abs=1e-6)
    assert stats["similarity_min"] == pytest.approx(0.5, abs=1e-6)
    assert sum(count for _, count in similarity_histogram(table, bins=4)) == 6


def test_mining_quantile_threshold_hand_computed():
    # top-1 similarities: A 1.0 (t0), B cos 10 deg = 0.985 (t80), C cos 120 deg = -0.5 (t80); median = 0.985
    config = MiningConfig(top_k=20, threshold=None, threshold_quantile=0.5, chunk_size=3)
    table, threshold = mine_pseudo_captions(["A", "B", "C"], IMAGES, POOL, TEXTS, config)
    assert threshold == pytest.approx(math.cos(math.radians(10)), abs=1e-6)
    assert _captions(table) == {"A": ["t0"]}  # strictly above: B's own top-1 equals the threshold
    table, threshold = mine_pseudo_captions(["A", "B", "C"], IMAGES, POOL, TEXTS,
                                            MiningConfig(threshold=None, threshold_quantile=0.0))
    assert threshold == pytest.approx(-0.5, abs=1e-6)  # minimum of the top-1s
    assert _captions(table)["B"] == ["t80", "t60", "t30", "t0"]  # every caption above -0.5 for B
    assert "C" not in _captions(table)  # C's best (-0.5) is not above itself


def test_mining_empty_table_keeps_schema():
    table, _ = mine_pseudo_captions(["C"], IMAGES[2:], POOL, TEXTS, MiningConfig(threshold=0.0))
    assert table.height == 0 and table.schema == {"image_id": pl.String, "rank": pl.Int32,
                                                  "caption": pl.String, "similarity": pl.Float32}
    assert similarity_histogram(table) == []


def test_dedupe_texts():
    texts = ["a  red   circle", "a red circle", "", "   ", "A red circle", "blue\nsquare ", "blue square", "x"]
    assert dedupe_texts(texts) == ["a red circle", "A red circle", "blue square", "x"]


# ------------------------------------------------------------------ evaluate_model

def test_evaluate_model_on_shapes(shapes_source: Path, caption_source: Path, tmp_path: Path):
    rows = ingest(str(shapes_source), scan_source(str(shapes_source))).accepted
    split = split_by_class(rows, val_fraction=0.2, test_fraction=0.4, seed=0)
    test = split.filter(pl.col("split") == "test")
    assert 2 <= test["label"].n_unique() < 16
    pairs = ingest(str(caption_source), scan_source(str(caption_source), captions_only=True),
                   captions_only=True).accepted.select("uri", "caption")
    pairs = pl.concat([pairs, pairs.head(2).with_columns(pl.lit("A second   caption").alias("caption"))])
    torch.manual_seed(0)
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path)
    seen: list[tuple[int, int]] = []
    cache = EmbeddingCache()
    config = EvalConfig(templates=("a photo of a {}.", "{}"), batch_size=8, gallery_queries=3)
    result = evaluate_model(bundle, test, config, caption_pairs=pairs, cache=cache,
                            progress=lambda done, total: seen.append((done, total)))
    metrics = result.metrics
    for column in METRIC_COLUMNS:
        assert 0.0 <= metrics[column] <= 1.0, column
        assert metrics[column] == pytest.approx(np.nanmean(result.per_query[column]))  # the bootstrap's input
    assert metrics["i2i_mean"] == pytest.approx((metrics["i2i_map"] + metrics["i2i_r1"]) / 2)
    assert metrics["knn_mean"] == pytest.approx(metrics["knn_top1"])
    assert metrics["zs_mean"] == pytest.approx(metrics["zs_top1"])
    assert metrics["t2i_mean"] == pytest.approx(metrics["t2i_r5"])  # held-out pairs, the paper's column
    headline = ("i2i_map", "i2i_r1", "knn_top1", "zs_top1", "t2i_r5")
    assert metrics["avg"] == pytest.approx(sum(metrics[c] for c in headline) / 5)
    assert metrics["t2i_r1"] <= metrics["t2i_r5"] <= metrics["t2i_r10"]
    assert metrics["t2i_cls_r1"] <= metrics["t2i_cls_r5"] <= metrics["t2i_cls_r10"]
    # 24 images with one caption each + one shared second caption: 25 caption queries over 24 images
    assert len(result.per_query["t2i_r5"]) == 25 and len(result.per_query["i2i_map"]) == test.height
    assert len(result.per_query["t2i_cls_r5"]) == test["caption"].n_unique()
    # the query counts as a hit and ranks first (self-similarity 1), so each AP is at least 1/3
    assert metrics["i2i_map"] >= 1 / 3
    assert result.image_embeddings.shape == (test.height, 32)
    torch.testing.assert_close(result.image_embeddings.norm(dim=1), torch.ones(test.height))
    assert set(result.per_source) == {"shapes-a", "shapes-b"}
    assert seen[-1] == (24, 24)  # the caption images are embedded after the test split
    assert len(result.t2i_examples) == 3 and all(len(e.uris) == 5 for e in result.t2i_examples)
    assert result.t2i_examples[0].query == "a drawing of a " + pairs["caption"][0].split("a drawing of a ")[1]
    # a second variant with the same weights reuses every embedding; changed weights do not
    seen.clear()
    again = evaluate_model(bundle, test, config, caption_pairs=pairs, cache=cache,
                           progress=lambda done, total: seen.append((done, total)))
    assert seen == [] and again.metrics == metrics
    with torch.no_grad():
        next(p for n, p in bundle.model.named_parameters() if n.startswith("visual.")).add_(0.5)
    changed = evaluate_model(bundle, test, config, caption_pairs=pairs, cache=cache,
                             progress=lambda done, total: seen.append((done, total)))
    assert (test.height, test.height) in seen and seen[-1] == (24, 24)  # both image sets embedded again
    assert changed.metrics["i2i_map"] != metrics["i2i_map"]


def test_evaluate_model_without_caption_pairs_leaves_t2i_nan(shapes_source: Path, tmp_path: Path):
    rows = ingest(str(shapes_source), scan_source(str(shapes_source))).accepted
    test = split_by_class(rows, val_fraction=0.2, test_fraction=0.4, seed=0).filter(pl.col("split") == "test")
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path)
    result = evaluate_model(bundle, test, EvalConfig(templates=("{}",), batch_size=8))
    assert np.isnan(result.metrics["t2i_r5"]) and np.isnan(result.metrics["t2i_mean"])
    assert result.metrics["avg"] == pytest.approx(np.mean([result.metrics[c] for c in
                                                           ("i2i_map", "i2i_r1", "knn_top1", "zs_top1")]))
    assert result.t2i_examples == [] and len(result.per_query["t2i_r5"]) == 0


def test_caption_benchmark_groups_queries_by_normalised_caption():
    pairs = pl.DataFrame({"uri": ["a", "a", "b", "c", "b"], "caption": ["A  cat", "a dog", "a cat", "", "a dog"]})
    bench = caption_benchmark(pairs)
    assert bench.texts == ["A cat", "a dog"] and bench.uris == ["a", "b"]
    assert bench.relevant == [[0, 1], [0, 1]]


def test_evaluate_model_rejects_empty_split(tmp_path: Path):
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path)
    empty = pl.DataFrame(schema={"uri": pl.String, "label": pl.String, "category": pl.String,
                                 "caption": pl.String, "source": pl.String})
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(bundle, empty)
