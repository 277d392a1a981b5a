"""Ingest in batches (clipopt_core.data.ingest_stream): the same result as one batch, cross-batch duplicates,
nothing published on failure, changed inputs, and the append-only facts cache behind it."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipopt_core.data import file_facts
from clipopt_core.data import sources as src
from clipopt_core.data.ingest_state import ContentOwners, KeyRuns, SeenKeys
from clipopt_core.data.ingest_stream import ingest_to_files
from clipopt_core.data.manifest import ManifestError, ingest, scan_source
from clipopt_core.runtime.digest import frame_digest

from tests.conftest import write_shapes_source
from tests.unit.test_sources import ReadCounter, write_label_shards, write_noise_shards, write_sources_file


def _row(path: str, label: str) -> dict:
    return {"path": path, "label": label, "caption": None, "category": None, "source": None}


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """48 images + a broken one, a copy of blue_cross/0 under another label and under its own, a path
    listed twice and a missing file; the repeats come last, so small batches split them from the first."""
    root = write_shapes_source(tmp_path / "mixed", per_class=3)
    (root / "red_circle/1.png").write_bytes(b"broken")
    shutil.copy(root / "blue_cross/0.png", root / "copy.png")
    shutil.copy(root / "blue_cross/0.png", root / "same.png")
    rows = pl.read_csv(root / "manifest.csv").to_dicts()
    rows += [_row("copy.png", "other"), _row("same.png", "blue cross"), _row("red_circle/0.png", "red circle"),
             _row("nope.png", "x")]
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


def _to_files(listing: pl.DataFrame, folder: Path, **options) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    folder.mkdir(parents=True, exist_ok=True)
    listing.write_parquet(folder / "listing.parquet")
    summary = ingest_to_files(folder / "listing.parquet", folder / "accepted.parquet", folder / "rejected.parquet",
                              **options)
    accepted, rejected = pl.read_parquet(folder / "accepted.parquet"), pl.read_parquet(folder / "rejected.parquet")
    assert (summary.accepted_rows, summary.rejected_rows) == (accepted.height, rejected.height)
    return accepted, rejected, summary.digest


def test_small_batches_give_the_one_batch_result_and_digest(tmp_path: Path, mixed: Path):
    whole = ingest(str(mixed), scan_source(str(mixed)))  # the whole-frame path: one frame, no batches
    listing = src.scan_images(str(mixed))
    for batch_rows in (1, 5, 16, 100_000):
        accepted, rejected, digest = _to_files(listing, tmp_path / f"b{batch_rows}", batch_rows=batch_rows)
        assert accepted.equals(whole.accepted) and rejected.equals(whole.rejected), batch_rows
        assert digest == frame_digest(whole.accepted)
    assert accepted.height == 47 and dict(zip(rejected["path"], rejected["reason"])) == {
        "red_circle/1.png": "not_an_image", "copy.png": "duplicate_content_other_label",
        "red_circle/0.png": "duplicate_path", "nope.png": "missing_file"}  # same.png: same image, same label: left out


def test_batches_across_folder_and_shard_sources_keep_the_single_pass_order(tmp_path: Path):
    shapes = write_shapes_source(tmp_path / "shapes", per_class=2)
    labels = pl.read_csv(shapes / "manifest.csv")["label"].unique().to_list()
    noise = write_noise_shards(tmp_path / "noise", labels).parent
    copies = write_label_shards(tmp_path / "copies", shapes, per_shard=7)  # the folder's bytes again, in shards
    sources = write_sources_file(tmp_path, [{"name": "web", "location": str(noise), "weight": 1},
                                            {"name": "folder", "location": "shapes", "weight": 3},
                                            {"name": "again", "location": str(copies), "weight": 2}])
    listing = src.scan_images(str(sources))
    one = _to_files(listing, tmp_path / "one", batch_rows=1_000)
    for batch_rows in (3, 10):
        accepted, rejected, digest = _to_files(listing, tmp_path / f"b{batch_rows}", batch_rows=batch_rows)
        assert accepted.equals(one[0]) and rejected.equals(one[1]) and digest == one[2] == frame_digest(accepted)
    accepted, rejected, _ = one
    assert accepted["source"].to_list()[:32] == ["folder"] * 32  # file rows first, as a single pass takes them
    assert "source_weight" in accepted.columns and accepted.height == 64
    assert set(rejected["reason"]) == {"duplicate_content_other_label"} and rejected.height == 32
    assert rejected["detail"][0].startswith("same bytes as an image labelled 'folder/")


def test_repeats_in_a_later_batch_are_caught_with_the_same_reason_and_detail(tmp_path: Path, mixed: Path):
    accepted, rejected, _ = _to_files(src.scan_images(str(mixed)), tmp_path / "out", batch_rows=4)
    details = dict(zip(rejected["path"], rejected["detail"]))
    assert details["copy.png"] == "same bytes as an image labelled 'blue cross'"
    assert details["red_circle/0.png"] == "'red_circle/0.png' listed more than once"
    assert "same.png" not in set(accepted["path"]) | set(rejected["path"])
    shards = write_label_shards(tmp_path / "shards", write_shapes_source(tmp_path / "plain", per_class=2), per_shard=40)
    listing = src.scan_images(str(shards))
    repeated = pl.concat([listing, listing.head(3)])  # the same shard members listed again, batches later
    accepted, rejected, _ = _to_files(repeated, tmp_path / "shards-out", batch_rows=8)
    assert rejected.filter(pl.col("reason") == "duplicate_path")["detail"].to_list() == [
        f"{path} appears more than once in the shards" for path in listing.head(3)["path"]]


def test_a_failed_ingest_publishes_nothing_and_keeps_the_previous_files(tmp_path: Path, mixed: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    listing, out = src.scan_images(str(mixed)), tmp_path / "out"
    before = _to_files(listing, out, batch_rows=8)
    saved = {name: (out / name).read_bytes() for name in ("accepted.parquet", "rejected.parquet")}
    calls = []
    original = file_facts.read_fact

    def failing(data: bytes, name: str):
        calls.append(name)
        if len(calls) > 20:  # a few batches in
            raise RuntimeError("killed")
        return original(data, name)

    monkeypatch.setattr(file_facts, "read_fact", failing)
    with pytest.raises(RuntimeError, match="killed"):
        ingest_to_files(out / "listing.parquet", out / "accepted.parquet", out / "rejected.parquet", batch_rows=8)
    assert {name: (out / name).read_bytes() for name in saved} == saved
    assert sorted(p.name for p in out.iterdir()) == ["accepted.parquet", "listing.parquet", "rejected.parquet"]
    nothing = listing.with_columns(pl.lit("").alias("label"))
    nothing.write_parquet(out / "listing.parquet")
    with pytest.raises(ManifestError, match=r"no usable image .*empty_label"):
        ingest_to_files(out / "listing.parquet", out / "accepted.parquet", out / "rejected.parquet", batch_rows=8)
    assert {name: (out / name).read_bytes() for name in saved} == saved and before[0].height == 47


def test_a_replaced_image_changes_the_manifest_and_digest(tmp_path: Path, mixed: Path):
    cache, listing = tmp_path / "cache", src.scan_images(str(mixed))
    accepted, _, digest = _to_files(listing, tmp_path / "first", batch_rows=8, cache_dir=cache)
    target = mixed / "green_square/1.png"
    original = target.read_bytes()
    shutil.copy(mixed / "red_circle/2.png", target)  # another image's bytes under this path
    changed, rejected, changed_digest = _to_files(listing, tmp_path / "second", batch_rows=8, cache_dir=cache)
    assert changed_digest != digest and not changed.equals(accepted)
    assert "green_square/1.png" in set(rejected["path"])  # now the same bytes as a 'red circle'
    target.write_bytes(original)
    assert _to_files(listing, tmp_path / "third", batch_rows=8, cache_dir=cache)[2] == digest


def test_the_facts_cache_is_append_only_and_read_per_batch(tmp_path: Path, mixed: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    reads, cache, listing = ReadCounter(monkeypatch), tmp_path / "cache", src.scan_images(str(mixed))
    src.fingerprint(str(mixed), cache_dir=cache)
    facts = file_facts.FactsCache(cache, str(mixed))
    assert len(facts.parts()) == 1 and len(reads.take()) == 50  # 48 + copy.png + same.png
    _to_files(listing, tmp_path / "warm", batch_rows=5, cache_dir=cache)
    assert reads.take() == [] and len(facts.parts()) == 1  # every batch found its facts; nothing written
    (mixed / "blue_circle/0.png").write_bytes((mixed / "red_circle/0.png").read_bytes())
    _to_files(listing, tmp_path / "changed", batch_rows=5, cache_dir=cache)
    assert reads.take() == ["blue_circle/0.png"]
    assert [pl.read_parquet(part)["path"].to_list() for part in facts.parts()[1:]] == [["blue_circle/0.png"]]


def test_cross_batch_state_marks_repeats_and_owners():
    seen = SeenKeys()
    assert seen.mark(["a", None, "b", "a"]).to_list() == [False, False, False, True]
    assert seen.mark(["b", None, "c", "c"]).to_list() == [True, False, False, True] and len(seen.keys) == 3
    owners = ContentOwners()
    first, second = "ab" * 32, "cd" * 32
    owners.add(pl.DataFrame({"sha256": [first, second], "label": ["x", "y"]}))
    assert owners.owner_labels(pl.Series([second, "ef" * 32, first])).to_list() == ["y", None, "x"]


def test_key_runs_find_keys_sharing_their_high_half_and_merge_runs():
    runs = KeyRuns(values=True)
    hi, lo = np.array([5, 5, 7, 9], dtype=np.uint64), np.array([1, 2, 3, 4], dtype=np.uint64)
    runs.add(hi[:2], lo[:2], np.array([10, 11]))
    assert len(runs.runs) == 1
    runs.add(hi[2:], lo[2:], np.array([12, 13]))
    assert [len(run[0]) for run in runs.runs] == [4]  # two runs of one size merge into one
    found = runs.find(np.array([5, 5, 5, 9, 7], dtype=np.uint64), np.array([2, 1, 3, 4, 4], dtype=np.uint64))
    assert found.tolist() == [11, 10, -1, 13, -1]
    runs.add(np.arange(100, 120, dtype=np.uint64), np.zeros(20, dtype=np.uint64), np.arange(20))
    assert len(runs) == 24 and runs.find(np.array([105], dtype=np.uint64), np.array([0], dtype=np.uint64)).tolist() == [5]


def test_a_facts_table_of_the_previous_release_is_still_used(tmp_path: Path, mixed: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    reads, cache = ReadCounter(monkeypatch), tmp_path / "cache"
    first = src.fingerprint(str(mixed), cache_dir=cache)
    facts = file_facts.FactsCache(cache, str(mixed))
    (part,) = facts.parts()
    part.rename(facts.legacy)  # the whole table the previous release kept beside the parts folder
    reads.take()
    assert facts.parts() == [facts.legacy] and src.fingerprint(str(mixed), cache_dir=cache) == first
    assert reads.take() == []
