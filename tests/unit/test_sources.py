"""Labelled sources beyond one folder (clipopt_core.data.sources), the per-file facts cache behind ingest and
fingerprints (clipopt_core.data.file_facts), and weighted per-source batches (SourceWeightedBatches)."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from clipopt_core.data import file_facts
from clipopt_core.data import sources as src
from clipopt_core.data.datasets import EpochBatches, SourceWeightedBatches, encode_labels, load_image
from clipopt_core.data.images import decode_image
from clipopt_core.data.manifest import ManifestError, ingest, scan_source, source_fingerprint, split_by_class
from clipopt_core.data.tar_shards import ShardError
from clipopt_core.runtime.distributed import ShardedBatches
from clipopt_core.runtime.digest import frame_digest

from tests.conftest import write_shapes_source


def write_label_shards(folder: Path, source: Path, *, per_shard: int = 20, label_as: str = "cls") -> Path:
    """The rows of a shapes source (``manifest.csv``) as webdataset shards: ``<key>.png`` + ``.cls``/``.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = pl.read_csv(source / "manifest.csv").to_dicts()
    for number in range(0, len(rows), per_shard):
        members = []
        for offset, row in enumerate(rows[number:number + per_shard]):
            key = f"{number + offset:05d}"
            label = (row["label"].encode() if label_as == "cls"
                     else json.dumps({"label": row["label"], "caption": row["caption"]}).encode())
            members += [(f"{key}.png", (source / row["path"]).read_bytes()), (f"{key}.{label_as}", label)]
        write_tar(folder / f"part-{number // per_shard:03d}.tar", members)
    return folder


def write_noise_shards(folder: Path, labels: list[str], *, per_class: int = 2, seed: int = 0) -> Path:
    """One shard of random-noise PNGs (bytes unique to ``seed``), ``per_class`` per label, labels as ``.cls``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    members = []
    for number, label in enumerate(label for label in labels for _ in range(per_class)):
        buffer = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
        members += [(f"{number:05d}.png", buffer.getvalue()), (f"{number:05d}.cls", label.encode())]
    return write_tar(folder / "noise-000.tar", members)


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def shapes(tmp_path: Path) -> Path:
    return write_shapes_source(tmp_path / "shapes", per_class=2)


class ReadCounter:
    """Counts files read (hashed + decoded) through :func:`clipopt_core.data.file_facts.read_fact`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        original = file_facts.read_fact

        def counting(data: bytes, name: str):
            self.names.append(name)
            return original(data, name)

        monkeypatch.setattr(file_facts, "read_fact", counting)
        monkeypatch.setattr(src, "read_fact", counting)

    def take(self) -> list[str]:
        names, self.names = sorted(self.names), []
        return names


# ------------------------------------------------------------------ tar shards

def test_shard_source_rows_open_in_place_with_their_labels(tmp_path: Path, shapes: Path):
    shards = write_label_shards(tmp_path / "shards", shapes)
    assert src.resolve_layout(str(shards)) == "shards"
    result = src.ingest_listing(src.scan_images(str(shards)))
    manifest = pl.read_csv(shapes / "manifest.csv")
    assert result.accepted.height == manifest.height and result.rejected.height == 0
    assert sorted(result.accepted["label"].unique()) == sorted(manifest["label"].unique())
    first = result.accepted.row(0, named=True)
    original = (shapes / manifest["path"][0]).read_bytes()
    assert first["uri"].startswith(f"{shards}/part-000.tar#00000.png@") and first["label"] == manifest["label"][0]
    assert load_image(first["uri"]).tobytes() == decode_image(original).tobytes()  # one range read, no extraction


def test_shard_labels_from_json_with_caption(tmp_path: Path, shapes: Path):
    shards = write_label_shards(tmp_path / "shards", shapes, label_as="json")
    accepted = src.ingest_listing(src.scan_images(f"{shards}/part-{{000..001}}.tar")).accepted
    assert accepted.height == 32 and accepted["caption"][0] == pl.read_csv(shapes / "manifest.csv")["caption"][0]


def test_bad_samples_in_a_shard_are_rejected_naming_shard_and_key(tmp_path: Path, shapes: Path):
    good = (shapes / "red_circle/0.png").read_bytes()
    shard = write_tar(tmp_path / "bad.tar", [
        ("a.png", good), ("a.cls", b"7"),
        ("b.png", good[: len(good) // 2]), ("b.cls", b"7"),  # truncated image
        ("c.png", (shapes / "blue_cross/0.png").read_bytes()),  # no label at all
        ("d.png", (shapes / "green_square/0.png").read_bytes()), ("d.json", b'{"caption": "no label"}'),
        ("e.txt", b"a caption without an image"), ("e.cls", b"3"),
        ("f.png", (shapes / "red_square/0.png").read_bytes()), ("f.json", b"{not json"),
    ])
    result = src.ingest_listing(src.scan_images(str(shard)))
    rejected = {row["path"].rsplit("/", 1)[1]: row for row in result.rejected.to_dicts()}
    assert {name: row["reason"] for name, row in rejected.items()} == {
        "b.png": "truncated", "c.png": "missing_label", "d.png": "missing_label", "e.image": "missing_image",
        "f.png": "invalid_label_json"}
    for name, row in rejected.items():
        assert f"shard {shard}, key '{name.split('.')[0]}'" in row["detail"]
    assert result.accepted["label"].to_list() == ["7"]


def test_compressed_shard_is_refused_with_the_fix(tmp_path: Path, shapes: Path):
    shard = write_tar(tmp_path / "z.tar", [("a.png", (shapes / "red_circle/0.png").read_bytes()), ("a.cls", b"1")],
                      mode="w:gz")
    with pytest.raises(ShardError, match="compressed.*uncompressed"):
        src.scan_images(str(shard))


def test_changed_shard_is_read_again_and_unchanged_one_is_not(tmp_path: Path, shapes: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    shards = write_label_shards(tmp_path / "shards", shapes)
    reads, cache = ReadCounter(monkeypatch), tmp_path / "cache"
    first = src.fingerprint(str(shards), cache_dir=cache)
    assert len(reads.take()) == 32
    assert src.fingerprint(str(shards), cache_dir=cache) == first and reads.take() == []
    assert src.scan_images(str(shards), cache_dir=cache).height == 32 and reads.take() == []
    os.utime(shards / "part-001.tar", ns=(1, 1))  # touched: read again, same content
    assert src.fingerprint(str(shards), cache_dir=cache) == first and len(reads.take()) == 12
    write_label_shards(tmp_path / "other", write_shapes_source(tmp_path / "s2", per_class=2, seed=5))
    shutil.copy(tmp_path / "other" / "part-001.tar", shards / "part-001.tar")
    assert src.fingerprint(str(shards), cache_dir=cache) != first and len(reads.take()) == 12


# ------------------------------------------------------------------ sources files

def write_sources_file(tmp_path: Path, entries: list[dict], suffix: str = "yaml") -> Path:
    path = tmp_path / f"sources.{suffix}"
    path.write_text(json.dumps({"sources": entries}))  # JSON is YAML too
    return path


def test_two_sources_get_disjoint_class_ids_and_weights(tmp_path: Path, shapes: Path):
    labels = pl.read_csv(shapes / "manifest.csv")["label"].unique().to_list()
    shards = write_noise_shards(tmp_path / "shards", labels).parent
    sources = write_sources_file(tmp_path, [{"name": "folder", "location": "shapes", "weight": 3},
                                            {"name": "web", "location": str(shards), "weight": 1}])
    result = src.ingest_listing(src.scan_images(str(sources)))
    accepted = result.accepted
    assert result.rejected.height == 0 and accepted.height == 64
    assert {"folder/red circle", "web/red circle"} <= set(accepted["label"])
    ids, names = encode_labels(accepted["label"].to_list())
    assert len(names) == 32  # 16 classes per source, none shared
    counts = src.source_counts(accepted)
    assert counts.to_dicts() == [{"source": "folder", "images": 32, "classes": 16, "weight": 3.0, "share": 0.75},
                                 {"source": "web", "images": 32, "classes": 16, "weight": 1.0, "share": 0.25}]
    numbers, weights = src.source_weights(accepted)
    assert weights == [3.0, 1.0] and numbers == [0 if s == "folder" else 1 for s in accepted["source"]]


def test_sources_without_weights_sample_as_one_source(tmp_path: Path, shapes: Path):
    sources = write_sources_file(tmp_path, [{"name": "a", "location": "shapes"}], suffix="json")
    accepted = src.ingest_listing(src.scan_images(str(sources))).accepted
    assert "source_weight" not in accepted.columns and src.source_weights(accepted) is None
    assert src.source_counts(accepted)["share"].to_list() == [1.0]
    assert src.source_weights(ingest(str(shapes), scan_source(str(shapes))).accepted) is None  # a plain folder


@pytest.mark.parametrize("entries, match", [
    ([{"name": "a", "location": "x", "weight": 1}, {"name": "b", "location": "y"}], r"weight or none; \['b'\]"),
    ([{"name": "a", "location": "x"}, {"name": "a", "location": "y"}], "names must be unique"),
    ([{"name": "a/b", "location": "x"}], "must match"),
    ([{"name": "a", "location": "x", "layout": "zip"}], "layout 'zip'"),
    ([{"name": "a", "location": "x", "weight": -1}], "positive number"),
    ([{"name": "a"}], "needs 'name' and 'location'"),
    ([], "non-empty list"),
])
def test_bad_sources_files_name_the_problem(tmp_path: Path, entries: list, match: str):
    with pytest.raises(ManifestError, match=match):
        src.read_sources_file(str(write_sources_file(tmp_path, entries)))


def test_changing_a_weight_changes_the_fingerprint(tmp_path: Path, shapes: Path):
    one = src.fingerprint(str(write_sources_file(tmp_path, [{"name": "a", "location": "shapes", "weight": 1}])))
    two = src.fingerprint(str(write_sources_file(tmp_path, [{"name": "a", "location": "shapes", "weight": 2}])))
    assert one != two


# ------------------------------------------------------------------ ingest: parallel, cached, columnar

@pytest.fixture()
def mixed_source(tmp_path: Path) -> Path:
    root = write_shapes_source(tmp_path / "mixed", per_class=3)
    (root / "red_circle/1.png").write_bytes(b"broken")
    shutil.copy(root / "blue_cross/0.png", root / "copy.png")
    rows = pl.read_csv(root / "manifest.csv").to_dicts()
    rows += [{"path": "copy.png", "label": "other", "caption": None, "category": None, "source": None},
             {"path": "red_circle/0.png", "label": "red circle", "caption": None, "category": None, "source": None},
             {"path": "nope.png", "label": "x", "caption": None, "category": None, "source": None}]
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


def test_parallel_ingest_equals_serial(mixed_source: Path):
    rows = scan_source(str(mixed_source))
    serial = ingest(str(mixed_source), rows, workers=1)
    parallel = ingest(str(mixed_source), rows, workers=6)
    assert serial.accepted.equals(parallel.accepted) and serial.rejected.equals(parallel.rejected)
    assert dict(zip(serial.rejected["path"], serial.rejected["reason"])) == {
        "red_circle/1.png": "not_an_image", "copy.png": "duplicate_content_other_label",
        "red_circle/0.png": "duplicate_path", "nope.png": "missing_file"}


def test_each_file_is_read_once_across_fingerprint_and_ingest(tmp_path: Path, mixed_source: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    reads, cache, rows = ReadCounter(monkeypatch), tmp_path / "cache", scan_source(str(mixed_source))
    fingerprint = source_fingerprint(rows, str(mixed_source), cache_dir=cache)
    assert len(reads.take()) == 49  # 48 images + copy.png; the missing file is never opened
    cached = ingest(str(mixed_source), rows, cache_dir=cache, workers=3)
    assert reads.take() == []
    plain = ingest(str(mixed_source), rows)
    assert cached.accepted.equals(plain.accepted) and cached.rejected.equals(plain.rejected)
    assert len(reads.take()) == 49  # without the cache: read again
    assert source_fingerprint(rows, str(mixed_source), cache_dir=cache) == fingerprint and reads.take() == []


def test_stat_cache_rehashes_changed_files_and_keeps_content_identity(tmp_path: Path, shapes: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    reads, cache, rows = ReadCounter(monkeypatch), tmp_path / "cache", scan_source(str(shapes))
    first = source_fingerprint(rows, str(shapes), cache_dir=cache)
    manifest = ingest(str(shapes), rows, cache_dir=cache).accepted
    reads.take()
    target = shapes / "red_circle/0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch: new mtime, same bytes
    assert source_fingerprint(rows, str(shapes), cache_dir=cache) == first
    assert reads.take() == ["red_circle/0.png"]  # re-hashed because its signature moved
    touched = ingest(str(shapes), rows, cache_dir=cache).accepted
    assert frame_digest(touched) == frame_digest(manifest)  # what training identities hash: content only
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert source_fingerprint(rows, str(shapes), cache_dir=cache) != first
    assert reads.take() == ["red_circle/0.png"]
    assert frame_digest(ingest(str(shapes), rows, cache_dir=cache).accepted) != frame_digest(manifest)


def test_a_damaged_facts_cache_costs_a_reread_not_a_failure(tmp_path: Path, shapes: Path):
    rows, cache = scan_source(str(shapes)), tmp_path / "cache"
    first = source_fingerprint(rows, str(shapes), cache_dir=cache)
    facts = file_facts.FactsCache(cache, str(shapes))
    (part,) = facts.parts()
    part.write_bytes(b"not parquet")
    assert source_fingerprint(rows, str(shapes), cache_dir=cache) == first
    assert not part.exists()  # the damaged part is dropped; its facts were read again into a new one
    assert [pl.read_parquet(new).height for new in facts.parts()] == [32]


# ------------------------------------------------------------------ weighted per-source batches

def test_one_source_gives_exactly_the_epoch_batches():
    for epoch, start in ((0, 0), (2, 3)):
        weighted = list(SourceWeightedBatches([0] * 50, [1.0], 8, seed=4, epoch=epoch, start_step=start))
        assert weighted == list(EpochBatches(50, 8, seed=4, epoch=epoch, start_step=start))


def test_weighted_batches_are_proportional_and_deterministic():
    sources = [0] * 10 + [1] * 90  # a small source weighted up: 60% of draws from 10% of the items
    batches = list(SourceWeightedBatches(sources, [3.0, 2.0], 10, seed=1, epoch=0))
    assert len(batches) == 10
    for batch in batches:
        assert sum(sources[i] == 0 for i, _ in batch) == 6  # the share holds in every batch
    drawn = [i for batch in batches for i, _ in batch]
    small = [i for i in drawn if i < 10]
    assert sorted(set(small)) == list(range(10)) and len(small) == 60  # cycled 6 times
    assert len(set(drawn) - set(small)) == 40  # the big source is sub-sampled, without repeats
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # repeated items get new augmentations
    again = list(SourceWeightedBatches(sources, [3.0, 2.0], 10, seed=1, epoch=0))
    assert again == batches and list(SourceWeightedBatches(sources, [3.0, 2.0], 10, seed=1, epoch=1)) != batches
    assert list(SourceWeightedBatches(sources, [3.0, 2.0], 10, seed=1, epoch=0, start_step=7)) == batches[7:]
    assert SourceWeightedBatches(sources, [3.0, 2.0], 10, seed=1).draws_per_source() == [60, 40]


def test_weighted_batches_shard_over_ranks_like_epoch_batches():
    sampler = SourceWeightedBatches([0] * 16 + [1] * 48, [1.0, 1.0], 8, seed=0)
    ranks = [list(ShardedBatches(sampler, rank, 2)) for rank in range(2)]
    for step, batch in enumerate(sampler):
        assert ranks[0][step] + ranks[1][step] == batch  # contiguous, disjoint slices of the global batch


def test_weighted_batches_refuse_bad_input():
    with pytest.raises(ValueError, match="items and a positive weight"):
        SourceWeightedBatches([0, 0, 0, 0], [1.0, 1.0], 2, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        SourceWeightedBatches([0, 1], [1.0, 1.0], 4, seed=0)


def test_split_keeps_sources_classes_apart(tmp_path: Path, shapes: Path):
    labels = pl.read_csv(shapes / "manifest.csv")["label"].unique().to_list()
    write_noise_shards(tmp_path / "web", labels, per_class=3)
    sources = write_sources_file(tmp_path, [{"name": "a", "location": "shapes", "weight": 1},
                                            {"name": "b", "location": "web", "weight": 1}])
    splits = split_by_class(src.ingest_listing(src.scan_images(str(sources))).accepted, val_fraction=0.2,
                            test_fraction=0.3, seed=0)
    # the classes 'a/red circle' and 'b/red circle' are different classes, split independently
    assert splits.group_by("label").agg(pl.col("split").n_unique())["split"].max() == 1
    assert splits["source"].n_unique() == 2


def test_retrieval_task_draws_weighted_sources_only_when_weighted(tmp_path: Path, shapes: Path):
    from clipopt_core.data.datasets import ImageDataset, train_transform
    from clipopt_core.train.config import RetrievalConfig, TrainConfig
    from clipopt_core.train.tasks import RetrievalTask
    from tests.unit.test_training import fresh_bundle

    rows = ingest(str(shapes), scan_source(str(shapes))).accepted
    bundle = fresh_bundle(tmp_path / "models")
    ids, names = encode_labels(rows["label"].to_list())
    dataset = ImageDataset(rows["uri"].to_list(), ids, train_transform(bundle.image_size, bundle.mean, bundle.std))
    config = RetrievalConfig(train=TrainConfig(batch_size=8))
    numbers = [0 if s == "shapes-a" else 1 for s in rows["source"]]
    weighted = RetrievalTask(bundle, dataset, len(names), config, lambda b: 0.0, source_weights=(numbers, [3.0, 1.0]))
    sampler = weighted.batches(config.train, 0, 0).batch_sampler
    assert isinstance(sampler, SourceWeightedBatches) and sampler.draws_per_source() == [24, 8]
    plain = RetrievalTask(bundle, dataset, len(names), config, lambda b: 0.0)
    assert list(plain.batches(config.train, 0, 0).batch_sampler) == list(EpochBatches(32, 8, 0))


@pytest.mark.slow
def test_scale_ingest_benchmark_smoke(tmp_path: Path):
    """benchmarks/scale_ingest.py runs end to end at smoke sizes and prints its ratios (no timing asserted)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "scale_ingest.py"), "--smoke",
                           "--data", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ratios = dict(pair.split("=") for pair in done.stdout.strip().splitlines()[-1].removeprefix("RATIO ").split())
    assert set(ratios) == {"ingest_vs_old", "ingest_w1_vs_old", "shards_vs_old", "parallel_vs_serial",
                           "tick_warm_vs_full_hash", "manifest_time_after_vs_before", "manifest_rss_after_vs_before",
                           "manifest_bytes_per_row_before", "manifest_bytes_per_row_after",
                           *(f"{kind}_{figure}" for kind in ("listing", "listing_csv")
                             for figure in ("time_after_vs_before", "rss_after_vs_before", "bytes_per_row_before",
                                            "bytes_per_row_after"))}
    assert all(float(ratios[name]) > 0 for name in ratios if "bytes_per_row" not in name)  # ΔRSS may be ≤ 0
