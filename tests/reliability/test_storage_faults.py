"""Storage faults on a real S3 server (SeaweedFS on 127.0.0.1): stopped mid-run, then restarted."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from clipopt_core.runtime.storage import COMPLETE_MARKER, StorageError
from clipopt_dagster.resources import ArtifactStoreResource
from tests.reliability.conftest import SLOW_TRAIN, failure_text, materialize, metadata, wait_for_file
from tests.system.conftest import S3Server

pytestmark = pytest.mark.system

BOUND_S = 60
DATA = ("raw_images", "image_manifest", "image_splits", "base_model")


def _objects(server: S3Server, root: str) -> dict[str, str]:
    fs = server.filesystem()
    return {path: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.find(root)}


def test_s3_stopped_mid_training_fails_bounded_then_rerun_succeeds(s3: S3Server, tmp_path: Path, shapes_source: Path,
                                                                   record_property):
    url = s3.url("faults-" + tmp_path.name[-16:])
    options = s3.resource_options()
    assert materialize(DATA, tmp_path, shapes_source, store_url=url, **options).success
    root = url.removeprefix("s3://")
    published = _objects(s3, root)
    assert any(path.endswith("data/manifest.parquet") for path in published)

    stopped: dict[str, float] = {}

    def stop_when_training() -> None:
        wait_for_file(str(tmp_path / "cache/work/retrieval_encoder/*/last/state.json"), 120, interval=0.01)
        s3.stop()
        stopped["at"] = time.monotonic()

    stopper = threading.Thread(target=stop_when_training, daemon=True)
    stopper.start()
    train = {"retrieval_encoder": {"config": SLOW_TRAIN}}
    try:
        result = materialize(("retrieval_encoder",), tmp_path, shapes_source, ops=train, store_url=url, **options)
        ended = time.monotonic()
        stopper.join(10)
    finally:
        s3.start()
    assert "at" in stopped, "the server was not stopped during training"
    assert not result.success
    failed_after = ended - stopped["at"]
    record_property("failed_after_s", round(failed_after, 1))
    assert failed_after < BOUND_S, f"the run took {failed_after:.0f}s to give up"
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    record_property("step_retries", len(retries))
    text = failure_text(result)
    assert "StorageError" in text and "Check that the artifact store is reachable" in text, text
    assert s3.secret not in text

    # after the restart: everything published before is intact, and no half checkpoint is visible
    after = _objects(s3, root)
    assert {k: v for k, v in after.items() if k in published} == published
    assert not any(path.endswith(f"retrieval_encoder/{COMPLETE_MARKER}") for path in after)
    store = ArtifactStoreResource(base_url=url, **options).store()
    with pytest.raises(StorageError, match="not a complete artifact"):
        store.get_dir("models/retrieval_encoder", tmp_path / "half")

    rerun = materialize(("retrieval_encoder",), tmp_path, shapes_source, ops=train, store_url=url, **options)
    assert rerun.success, failure_text(rerun)
    assert metadata(rerun, "retrieval_encoder")["steps"] == 160  # the finished local training was reused
    assert (store.get_dir("models/retrieval_encoder", tmp_path / "ok") / "open_clip_model.safetensors").is_file()
    assert store.list_temp_objects() == []
