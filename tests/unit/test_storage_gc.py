"""Stale temp objects left by killed uploads are reclaimed; fresh ones (a concurrent upload) are kept."""
import os
import time

import dagster as dg

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.definitions import ASSETS
from tests.pipeline.conftest import tiny_resources


def _leave_temp(root, key: str, age_s: float) -> str:
    path = root / f"{key}.tmp-deadbeef"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half an upload")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return str(path)


def test_only_temp_objects_older_than_the_bound_are_removed(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    store.write_bytes("reports/evaluation.md", b"published")
    old = _leave_temp(tmp_path, "models/stage1/open_clip_model.safetensors", age_s=7200)
    fresh = _leave_temp(tmp_path, "reports/evaluation.md", age_s=10)
    removed = store.remove_stale_temp_objects(older_than_s=3600)
    assert removed == [old]
    assert store.list_temp_objects() == [fresh]
    assert store.read_bytes("reports/evaluation.md") == b"published"


def test_raw_images_reclaims_stale_temp_objects_of_earlier_runs(tmp_path, shapes_source):
    old = _leave_temp(tmp_path / "artifacts", "serving/index.faiss", age_s=2 * 86400)
    raw_images = next(a for a in ASSETS if a.key.to_user_string() == "raw_images")
    result = dg.materialize([raw_images], resources=tiny_resources(tmp_path, shapes_source, None))
    assert result.success
    assert result.asset_materializations_for_node("raw_images")[0].metadata["stale_temp_objects_removed"].value == 1
    assert not os.path.exists(old)
