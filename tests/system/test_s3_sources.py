"""Labelled tar shards and per-file facts on a real S3 server: shards listed and read in one pass, images opened
later by one range read of their shard, fingerprints from ETags (a changed object is read again), and missing
objects found from one listing."""
import polars as pl

from clipopt_core.data import sources as src
from clipopt_core.data.datasets import load_image
from clipopt_core.data.images import decode_image
from tests.unit.test_sources import write_label_shards


def test_shards_and_files_on_s3(s3, tmp_path, shapes_source):
    fs = s3.filesystem()
    shards_url = s3.upload(write_label_shards(tmp_path / "shards", shapes_source), "sources/shards")
    files_url = s3.upload(shapes_source, "sources/shapes")
    with s3.as_fsspec_default():
        cache = tmp_path / "cache"
        accepted = src.ingest_listing(src.scan_images(shards_url, cache_dir=cache), cache_dir=cache).accepted
        assert accepted.height == 48 and accepted["uri"].str.starts_with(f"{shards_url}/part-000.tar#00000.png@").any()
        first = pl.read_csv(shapes_source / "manifest.csv")["path"][0]
        assert load_image(accepted["uri"][0]).tobytes() == decode_image((shapes_source / first).read_bytes()).tobytes()

        before = src.fingerprint(files_url, cache_dir=cache)
        assert src.fingerprint(files_url, cache_dir=cache) == before
        target = f"{files_url.removeprefix('s3://')}/{first}"
        fs.pipe_file(target, (shapes_source / "blue_cross/0.png").read_bytes())  # new bytes: a new ETag
        assert src.fingerprint(files_url, cache_dir=cache) != before
        assert src.fingerprint(shards_url, cache_dir=cache) == src.fingerprint(shards_url)  # cached = cold

        listed = pl.read_csv(shapes_source / "manifest.csv")
        extra = pl.DataFrame([{**listed.row(0, named=True), "path": "nope/missing.png"}], schema=listed.schema)
        fs.pipe_file(f"{files_url.removeprefix('s3://')}/manifest.csv", pl.concat([listed, extra]).write_csv().encode())
        result = src.ingest_listing(src.scan_images(files_url), cache_dir=cache)
        assert result.accepted.height == 47  # one listing, not a request per row, tells which objects exist
        assert result.rejected.select("path", "reason").rows() == [  # blue_cross/0.png's bytes are red_circle/0.png's now
            ("blue_cross/0.png", "duplicate_content_other_label"), ("nope/missing.png", "missing_file")]
