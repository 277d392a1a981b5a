"""The source listing in batches (clipopt_core.data.listing, sources.write_listing): the rows and fingerprint
of the whole-source code with batches smaller than the source, changed inputs, nothing published on failure."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from clipopt_core.data import listing
from clipopt_core.data import manifest as mf
from clipopt_core.data import sources as src

from tests.conftest import write_shapes_source
from tests.unit.test_sources import ReadCounter, write_label_shards


def _whole(location: str, cache: Path) -> tuple[pl.DataFrame, str]:
    """The listing and fingerprint computed over the whole source at once (one frame, no batches)."""
    rows = mf.scan_source(location)
    return (rows.with_columns(pl.lit(mf.source_root(location)).alias("root")),
            mf.source_fingerprint(rows, location, cache_dir=cache))


@pytest.fixture()
def tricky_folders(tmp_path: Path) -> Path:
    """Class folders whose names sort differently alone and with their '/': 'a' < 'a-b' but 'a-b/' < 'a/'."""
    root = write_shapes_source(tmp_path / "folders", per_class=2, layout="folders")
    for name in ("a", "a-b", "a b", "a.b", "a_c", "ä"):
        (root / name).mkdir()
        shutil.copy(root / "red_circle/0.png", root / name / "x.png")
        shutil.copy(root / "blue_cross/1.png", root / name / "Y.PNG")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "top.png").write_bytes(b"a file at the top level is not in a class folder")
    return root


@pytest.fixture()
def unsorted_manifest(tmp_path: Path) -> Path:
    """A manifest out of path order, with a repeated path, a missing file, a null path and an escape."""
    root = write_shapes_source(tmp_path / "manifest", per_class=2)
    (root / "red_circle/1.png").write_bytes(b"broken")
    rows = pl.read_csv(root / "manifest.csv").to_dicts()[::-1]
    extra = [("red_circle/0.png", "red circle"), ("nope.png", "x"), (None, "x"), ("../up.png", "x")]
    rows += [{"path": p, "label": l, "caption": None, "category": None, "source": None} for p, l in extra]
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


@pytest.mark.parametrize("batch_rows", [1, 5, 64])
def test_batched_listing_equals_the_whole_source(tmp_path: Path, tricky_folders: Path, unsorted_manifest: Path,
                                                 batch_rows: int):
    parquet = write_shapes_source(tmp_path / "parquet", per_class=2)
    pl.read_csv(parquet / "manifest.csv").write_parquet(parquet / "manifest.parquet")
    (parquet / "manifest.csv").unlink()
    for location in (str(tricky_folders), str(unsorted_manifest), str(parquet), f"{unsorted_manifest}/manifest.csv"):
        rows, fingerprint = _whole(location, tmp_path / "cache-whole")
        target = tmp_path / "listing.parquet"
        summary = src.write_listing(location, "auto", target, cache_dir=tmp_path / f"cache-{batch_rows}",
                                    batch_rows=batch_rows)
        assert pl.read_parquet(target).equals(rows), location
        assert (summary.rows, summary.fingerprint) == (rows.height, fingerprint), location
        assert src.fingerprint(location, cache_dir=tmp_path / "cold") == fingerprint  # the sensor's value
        assert all(b.height <= batch_rows for b in mf.source_batches(location, batch_rows=batch_rows))


def test_class_folders_come_in_path_order_one_folder_at_a_time(tricky_folders: Path):
    expected = sorted(f"{folder}/{name}" for folder in os.listdir(tricky_folders)
                      if (tricky_folders / folder).is_dir() for name in os.listdir(tricky_folders / folder)
                      if name.lower().endswith(mf.IMAGE_EXTENSIONS))
    batches = list(mf.source_batches(str(tricky_folders), batch_rows=3))
    assert pl.concat(batches)["path"].to_list() == expected and len(batches) == -(-len(expected) // 3)
    assert "a-b/Y.PNG" in expected and "a/notes.txt" not in expected and "top.png" not in expected


@pytest.mark.parametrize("layout", ["folders", "manifest"])
def test_changed_inputs_move_fingerprint_and_listing_as_the_whole_source_does(tmp_path: Path, layout: str):
    root = write_shapes_source(tmp_path / "src", per_class=2, layout=layout)
    cache, target, seen = tmp_path / "cache", tmp_path / "listing.parquet", set()

    def run() -> str:
        summary = src.write_listing(str(root), "auto", target, cache_dir=cache, batch_rows=5)
        rows, fingerprint = _whole(str(root), tmp_path / "cache-whole")
        assert pl.read_parquet(target).equals(rows) and summary.fingerprint == fingerprint
        assert summary.fingerprint not in seen
        seen.add(summary.fingerprint)
        return summary.fingerprint

    run()
    shutil.copy(root / "blue_cross/0.png", root / "red_circle/1.png")  # replaced: new bytes, same path
    run()
    shutil.copy(root / "green_square/0.png", root / "red_circle/7.png")  # added
    if layout == "manifest":
        rows = pl.read_csv(root / "manifest.csv")
        pl.concat([rows, rows.head(1).with_columns(pl.lit("red_circle/7.png").alias("path"))]).write_csv(
            root / "manifest.csv")
    run()
    (root / "blue_cross/1.png").unlink()  # removed
    if layout == "manifest":
        pl.read_csv(root / "manifest.csv").filter(pl.col("path") != "blue_cross/1.png").write_csv(root / "manifest.csv")
    last = run()
    assert src.fingerprint(str(root), cache_dir=cache) == last
    os.utime(root / "red_circle/0.png")  # a touch without a change: the same fingerprint
    assert src.write_listing(str(root), "auto", target, cache_dir=cache, batch_rows=5).fingerprint == last


def test_warm_listing_reads_no_file(tmp_path: Path, tricky_folders: Path, monkeypatch: pytest.MonkeyPatch):
    reads, cache, target = ReadCounter(monkeypatch), tmp_path / "cache", tmp_path / "listing.parquet"
    first = src.write_listing(str(tricky_folders), "auto", target, cache_dir=cache, batch_rows=4).fingerprint
    assert len(reads.take()) == 44  # 32 shapes + 12 in the extra folders (the top-level file is no row)
    assert src.fingerprint(str(tricky_folders), cache_dir=cache) == first and reads.take() == []
    assert src.write_listing(str(tricky_folders), "auto", target, cache_dir=cache).fingerprint == first
    assert reads.take() == []


def test_failure_mid_listing_leaves_the_old_listing(tmp_path: Path, tricky_folders: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "out" / "listing.parquet"
    target.parent.mkdir()
    src.write_listing(str(tricky_folders), "auto", target, batch_rows=4)
    before = target.read_bytes()
    calls = []
    original = mf.fingerprint_rows

    def failing(rows: pl.DataFrame, root: str, **options) -> pl.DataFrame:
        calls.append(rows.height)
        if len(calls) == 3:
            raise OSError("disk went away")
        return original(rows, root, **options)

    monkeypatch.setattr(mf, "fingerprint_rows", failing)
    (tricky_folders / "a" / "z.png").write_bytes((tricky_folders / "a" / "x.png").read_bytes())
    with pytest.raises(OSError, match="disk went away"):
        src.write_listing(str(tricky_folders), "auto", target, batch_rows=4)
    assert target.read_bytes() == before and os.listdir(target.parent) == ["listing.parquet"]


def test_empty_and_bad_sources_raise_before_anything_is_written(tmp_path: Path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    target = tmp_path / "listing.parquet"
    with pytest.raises(mf.ManifestError, match="no images found in class folders"):
        src.write_listing(str(tmp_path / "empty"), "auto", target)
    bad = tmp_path / "bad"
    bad.mkdir()
    pl.DataFrame({"file": ["a.png"]}).write_csv(bad / "manifest.csv")
    with pytest.raises(mf.ManifestError, match=r"lacks column\(s\) \['path', 'label'\]"):
        src.write_listing(str(bad), "auto", target)
    with pytest.raises(ValueError, match="batch_rows must be at least 1"):
        src.write_listing(str(bad), "auto", target, batch_rows=0)
    assert not target.exists() and sorted(os.listdir(tmp_path)) == ["bad", "empty"]


def test_shards_keep_their_listing(tmp_path: Path, tricky_folders: Path):
    shards = write_label_shards(tmp_path / "shards", write_shapes_source(tmp_path / "s", per_class=2), per_shard=12)
    target = tmp_path / "listing.parquet"
    summary = src.write_listing(str(shards), "auto", target, cache_dir=tmp_path / "cache")
    assert pl.read_parquet(target).equals(src.scan_images(str(shards), cache_dir=tmp_path / "cache"))
    assert summary.fingerprint == src.fingerprint(str(shards), cache_dir=tmp_path / "cache")


def test_unsorted_source_hash_is_sorted_whole(tmp_path: Path, unsorted_manifest: Path):
    rows = mf.scan_source(str(unsorted_manifest))
    spooled = listing.SourceHash(str(unsorted_manifest), cache_dir=None, workers=1, spool=tmp_path)
    for start in range(0, rows.height, 7):
        spooled.add(rows.slice(start, 7))
    assert not spooled.in_order and spooled.hexdigest() == mf.source_fingerprint(rows, str(unsorted_manifest))
    unspooled = listing.SourceHash(str(unsorted_manifest), cache_dir=None, workers=1, spool=None)
    for start in range(0, rows.height, 7):
        unspooled.add(rows.slice(start, 7))
    with pytest.raises(RuntimeError, match="out of path order"):
        unspooled.hexdigest()
    ordered = listing.SourceHash(str(unsorted_manifest), cache_dir=None, workers=1, spool=None)
    in_path_order = rows.sort("path", maintain_order=True, nulls_last=False)
    for start in range(0, rows.height, 7):
        ordered.add(in_path_order.slice(start, 7))
    assert ordered.in_order and ordered.hexdigest() == spooled.hexdigest()  # nothing spooled, the same value


def test_class_folders_in_an_object_store_are_listed_per_folder(tmp_path: Path, tricky_folders: Path):
    """A non-local filesystem (fsspec's memory store): folders listed with ``ls``, the same rows and fingerprint."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for file in tricky_folders.rglob("*"):
        if file.is_file():
            fs.pipe_file(f"/listing15/{file.relative_to(tricky_folders)}", file.read_bytes())
    url = "memory://listing15"
    try:
        summary = src.write_listing(url, "auto", tmp_path / "listing.parquet", cache_dir=tmp_path / "cache",
                                    batch_rows=5)
        expected = sorted(p.removeprefix("/listing15/") for p in fs.find("/listing15") if p.count("/") == 3
                          and p.lower().endswith(mf.IMAGE_EXTENSIONS))
        assert pl.read_parquet(tmp_path / "listing.parquet")["path"].to_list() == expected
        assert summary.fingerprint == _whole(str(tricky_folders), tmp_path / "local")[1]  # the root is not hashed
        fs.pipe_file("/listing15/a-b/x.png", (tricky_folders / "blue_cross/0.png").read_bytes())  # new bytes
        shutil.copy(tricky_folders / "blue_cross/0.png", tricky_folders / "a-b/x.png")
        changed = src.fingerprint(url, cache_dir=tmp_path / "cache")  # warm cache: the listing tells what moved
        assert changed != summary.fingerprint and changed == _whole(str(tricky_folders), tmp_path / "local")[1]
    finally:
        fs.rm("/listing15", recursive=True)


def test_a_manifest_with_no_rows_lists_nothing_as_before(tmp_path: Path):
    root = tmp_path / "headers"
    root.mkdir()
    (root / "manifest.csv").write_text("path,label,caption\n")
    rows, fingerprint = _whole(str(root), tmp_path / "cache")
    assert rows.height == 0 and rows.columns == [*mf.LISTING_COLUMNS, "root"]
    summary = src.write_listing(str(root), "auto", tmp_path / "listing.parquet", batch_rows=2)
    assert (summary.rows, summary.fingerprint) == (0, fingerprint)
    assert pl.read_parquet(tmp_path / "listing.parquet").equals(rows)
