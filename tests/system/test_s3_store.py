"""ArtifactStore and the whole asset graph on a real S3 server (SeaweedFS on 127.0.0.1)."""
from __future__ import annotations

import json
import time

import dagster as dg
import polars as pl
import pytest

from clipopt_core.evaluate.report import VARIANTS
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore, StorageError
from clipopt_dagster.definitions import ASSETS
from clipopt_dagster.resources import ArtifactStoreResource
from tests.pipeline.conftest import tiny_resources, tiny_run_config
from tests.system.conftest import S3Server

pytestmark = pytest.mark.system

UNREACHABLE_BOUND_S = 30


def s3_store(server: S3Server, prefix: str | None = None) -> ArtifactStore:
    """The store exactly as the pipeline builds it (resource → ArtifactStore)."""
    return ArtifactStoreResource(base_url=server.url(prefix), **server.resource_options()).store()


def test_bytes_json_parquet_round_trip(s3):
    store = s3_store(s3)
    assert not store.is_local
    payload = bytes(range(256)) * 100
    digest = store.write_bytes("blobs/a.bin", payload)
    assert store.read_bytes("blobs/a.bin") == payload
    assert len(digest) == 64 and store.exists("blobs/a.bin") and not store.exists("blobs/missing.bin")

    store.write_json("meta/info.json", {"b": [1, 2], "a": "x"})
    assert store.read_json("meta/info.json") == {"a": "x", "b": [1, 2]}

    frame = pl.DataFrame({"id": list(range(1000)), "label": [f"class {i % 7}" for i in range(1000)],
                          "score": [i / 3 for i in range(1000)]})
    store.write_parquet("tables/frame.parquet", frame)
    assert store.read_parquet("tables/frame.parquet").equals(frame)

    # overwriting publishes the new content whole
    store.write_bytes("blobs/a.bin", b"second")
    assert store.read_bytes("blobs/a.bin") == b"second"
    assert store.url("blobs/a.bin") == f"{store.base_url}/blobs/a.bin"

    # the objects really are in the bucket, under the prefix, with no temporary leftovers
    listed = s3.filesystem().find(store.root)
    assert sorted(path.removeprefix(store.root + "/") for path in listed) == [
        "blobs/a.bin", "meta/info.json", "tables/frame.parquet"]
    assert store.list_temp_objects() == []

    with pytest.raises(StorageError, match="not found"):
        store.read_bytes("blobs/missing.bin")


def test_put_dir_get_dir_and_marker(s3, tmp_path):
    store = s3_store(s3)
    source = tmp_path / "checkpoint"
    (source / "sub").mkdir(parents=True)
    (source / "weights.bin").write_bytes(b"\x01" * 50_000)
    (source / "sub" / "config.json").write_text('{"dim": 8}')
    hashes = store.put_dir(source, "models/stage1")
    assert set(hashes) == {"weights.bin", "sub/config.json"}
    assert store.read_json(f"models/stage1/{COMPLETE_MARKER}") == {"files": hashes}

    target = store.get_dir("models/stage1", tmp_path / "download")
    assert (target / "weights.bin").read_bytes() == b"\x01" * 50_000
    assert json.loads((target / "sub" / "config.json").read_text()) == {"dim": 8}
    assert store.get_dir("models/stage1", target) == target  # already there with the same hashes

    # re-publishing replaces content and the marker
    (source / "weights.bin").write_bytes(b"\x02" * 10)
    assert store.put_dir(source, "models/stage1")["weights.bin"] != hashes["weights.bin"]
    assert (store.get_dir("models/stage1", tmp_path / "download") / "weights.bin").read_bytes() == b"\x02" * 10

    # a folder without a marker is refused; a tampered file is detected
    store.write_bytes("models/partial/weights.bin", b"half")
    with pytest.raises(StorageError, match="not a complete artifact"):
        store.get_dir("models/partial", tmp_path / "partial")
    store.write_bytes("models/stage1/weights.bin", b"tampered")
    with pytest.raises(StorageError, match="content hash differs"):
        store.get_dir("models/stage1", tmp_path / "fresh")
    assert not list(tmp_path.glob("fresh*")), "a failed download must not leave a staging folder"
    assert store.list_temp_objects() == []
    assert not [p for p in s3.filesystem().find(store.root) if ".tmp-" in p]


def test_wrong_credentials_fail_with_storage_error(s3):
    store = ArtifactStoreResource(base_url=s3.url(), endpoint_url=s3.endpoint_url, aws_access_key_id=s3.key,
                                  aws_secret_access_key="not-the-secret").store()
    with pytest.raises(StorageError) as excinfo:
        store.write_bytes("x.bin", b"x")
    assert "x.bin" in str(excinfo.value)
    assert s3.secret not in str(excinfo.value) and "not-the-secret" not in str(excinfo.value)


def test_full_graph_materialises_on_s3(s3, tmp_path, shapes_source, caption_source):
    from clipopt_dagster.definitions import ASSET_CHECKS, ASSETS, SUITE_ASSETS, defs
    from clipopt_dagster.partitions import ALL_SHARDS_TAGS

    url = s3.url("graph-" + tmp_path.name[-20:])
    resources = tiny_resources(tmp_path, shapes_source, caption_source, store_url=url, **s3.resource_options())
    result = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=resources, run_config=tiny_run_config(),
                            tags=ALL_SHARDS_TAGS)
    assert result.success
    materialised = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    suite = {key.to_user_string() for assets in SUITE_ASSETS for key in assets.keys}  # run on request, own roots
    assert materialised == {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()} - suite
    checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
    assert checks == {"manifest_valid": True, "alignment_preserved": True, "retrieval_improved": True,
                      "index_recall": True}

    # read back through a fresh store (no shared client state) and straight from the bucket
    store = s3_store(s3, url.removeprefix(f"s3://{s3.bucket}/"))
    report = store.read_parquet("reports/evaluation.parquet")
    assert report.height == 5 and report["variant"].to_list() == list(VARIANTS)
    assert store.read_bytes("reports/teaser.png")[:4] == b"\x89PNG"
    assert store.exists(f"models/realigned_mcip/{COMPLETE_MARKER}")
    assert store.read_json("serving/index/info.json")["n"] == store.read_parquet("data/manifest.parquet").height
    assert store.list_temp_objects() == []
    report_meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert report_meta["report_uri"].value == f"{url}/reports/evaluation.md"
    assert not list((tmp_path / "artifacts").glob("**/*")), "nothing may be written to the local default store"


def test_stopped_server_fails_fast_with_storage_error(s3, tmp_path):
    """Stop the real server: every store operation raises StorageError quickly; data survives a restart."""
    store = s3_store(s3)
    store.write_bytes("kept.bin", b"survives restarts")
    source = tmp_path / "dir"
    source.mkdir()
    (source / "f.txt").write_text("x")
    store.put_dir(source, "sealed")
    s3.stop()
    try:
        fresh = s3_store(s3, store.root.removeprefix(f"{s3.bucket}/"))  # a new client, no cached state
        operations = {
            "read": lambda: fresh.read_bytes("kept.bin"),
            "write": lambda: fresh.write_bytes("new.bin", b"new"),
            "get_dir": lambda: fresh.get_dir("sealed", tmp_path / "out"),
        }
        for name, operation in operations.items():
            started = time.monotonic()
            with pytest.raises(StorageError) as excinfo:
                operation()
            elapsed = time.monotonic() - started
            message = str(excinfo.value)
            assert elapsed < UNREACHABLE_BOUND_S, f"{name} took {elapsed:.1f}s to fail"
            assert "reachable" in message and store.base_url in message, message
            assert s3.secret not in message
    finally:
        s3.start()
    assert store.read_bytes("kept.bin") == b"survives restarts"
    assert (store.get_dir("sealed", tmp_path / "after") / "f.txt").read_text() == "x"


def test_image_source_on_an_s3_prefix_trains_from_s3(s3, tmp_path, shapes_source, caption_source):
    """Labelled images and caption pairs live under S3 prefixes; ingest, mining and training read them there."""
    images_url, captions_url = s3.upload(shapes_source, "sources/shapes"), s3.upload(caption_source, "sources/captions")
    with s3.as_fsspec_default():
        selection = [a for a in ASSETS if a.key.to_user_string() in
                     {"raw_images", "image_manifest", "image_splits", "caption_corpus", "base_model",
                      "pseudo_captions", "mcip_encoder"}]
        result = dg.materialize(selection, resources=tiny_resources(tmp_path, images_url, captions_url),
                                run_config={"ops": {k: v for k, v in tiny_run_config()["ops"].items()
                                                    if k in {"base_model", "image_splits", "pseudo_captions",
                                                             "mcip_encoder"}}})
    assert result.success
    manifest = ArtifactStore(f"file://{tmp_path / 'artifacts'}").read_parquet("data/manifest.parquet")
    assert manifest.height == 48 and all(uri.startswith("s3://") for uri in manifest["uri"])
    assert result.asset_materializations_for_node("mcip_encoder")[0].metadata["steps"].value > 0


def test_stale_temp_objects_are_removed_on_s3(s3):
    """The age comes from S3's LastModified; a bound of -1 s makes every temp object stale."""
    store = ArtifactStore(s3.url(), s3.storage_options)
    store.write_bytes("reports/evaluation.md", b"published")
    store.fs.pipe_file(store.path("models/stage1/weights.safetensors.tmp-deadbeef"), b"half an upload")
    assert store.remove_stale_temp_objects(older_than_s=3600) == []  # just written: kept
    assert len(store.remove_stale_temp_objects(older_than_s=-1)) == 1
    assert store.list_temp_objects() == [] and store.read_bytes("reports/evaluation.md") == b"published"
