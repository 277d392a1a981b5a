"""The code location as Dagster loads it: a snapshot of the graph, the schedule and the sensor.

These tests start no processes, so they are not marked ``system``.
"""
from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clipopt_dagster.automation import new_images_sensor, retraining_schedule
from clipopt_dagster.resources import ComputeResource, DataSourceResource
from tests.conftest import write_shapes_source

pytestmark: list = []

GPU = "clipopt_gpu"

# asset → (sorted parents, group, sorted checks, pool or None, code version).
# An intended graph change updates this literal; an accidental one fails the test.
GRAPH = {
    "raw_images": ([], "data", [], None, "2"),
    "image_manifest": (["raw_images"], "data", ["manifest_valid"], None, "2"),
    "image_splits": (["image_manifest"], "data", [], None, "1"),
    "caption_corpus": (["image_splits"], "data", [], None, "3"),
    "base_model": ([], "models", [], None, "1"),
    "pseudo_captions": (["base_model", "caption_corpus", "image_splits"], "data", [], GPU, "1"),
    "retrieval_encoder": (["base_model", "image_splits"], "training", [], GPU, "2"),
    "mcip_encoder": (["base_model", "image_splits", "pseudo_captions"], "training", [], GPU, "2"),
    "realigned_2sft": (["caption_corpus", "image_splits", "retrieval_encoder"], "training", [], GPU, "2"),
    "realigned_mcip": (["caption_corpus", "image_splits", "mcip_encoder"], "training", [], GPU, "2"),
    "seed_sweep": (["base_model", "caption_corpus", "image_splits", "pseudo_captions"], "evaluation", [], GPU, "1"),
    "evaluation_report": (["caption_corpus", "mcip_encoder", "realigned_2sft", "realigned_mcip", "retrieval_encoder"],
                          "evaluation", ["alignment_preserved", "retrieval_improved"], GPU, "3"),
    "served_model": (["evaluation_report"], "serving", [], GPU, "1"),
    "gallery_embeddings": (["served_model"], "serving", [], GPU, "3"),
    "faiss_index": (["gallery_embeddings"], "serving", ["index_recall"], None, "2"),
    "baseline_index": (["base_model", "image_manifest"], "serving", [], GPU, "1"),
    "benchmark_suite": (["base_model", "mcip_encoder", "realigned_2sft", "realigned_mcip", "retrieval_encoder"],
                        "benchmark_suite", [], GPU, "2"),
    "table1_report": (["benchmark_suite"], "benchmark_suite", [], None, "2"),
}
BLOCKING_CHECKS = {"manifest_valid": True, "alignment_preserved": True, "retrieval_improved": True,
                   "index_recall": True}
JOBS = ["retraining_job", "seed_sweep_job"]
SCHEDULES = {"weekly_retraining": ("0 3 * * 1", "UTC", "retraining_job")}
SENSORS = {"new_images_sensor": ("retraining_job", 300)}
TRAINING_RETRIES = {"retrieval_encoder", "mcip_encoder", "realigned_2sft", "realigned_mcip"}


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    from clipopt_dagster.definitions import defs as loaded

    return loaded


def test_definitions_load_and_validate(defs):
    from clipopt_dagster import definitions

    dg.Definitions.validate_loadable(defs)
    assert set(defs.resources) == {"store", "compute", "sources", "catalog"}
    from clipopt_dagster.run_claims import releasing_in_process_executor

    assert defs.resolve_job_def("retraining_job").executor_def is releasing_in_process_executor
    assert definitions.ASSETS and definitions.ASSET_CHECKS


def test_asset_graph_snapshot(defs):
    graph = defs.resolve_asset_graph()
    actual = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        pools = sorted(node.pools)
        assert len(pools) <= 1, f"{key.to_user_string()} has several pools {pools}"
        actual[key.to_user_string()] = (sorted(parent.to_user_string() for parent in node.parent_keys),
                                        node.group_name, sorted(check.name for check in node.check_keys),
                                        pools[0] if pools else None, node.code_version)
    assert actual == GRAPH


def test_checks_jobs_schedules_sensors_snapshot(defs):
    from clipopt_dagster.definitions import ASSET_CHECKS, ASSETS

    blocking = {spec.name: spec.blocking for checks in ASSET_CHECKS for spec in checks.check_specs}
    assert blocking == BLOCKING_CHECKS

    assert sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__")) == JOBS
    expected_schedules = dict(SCHEDULES)
    if os.environ.get("CLIPOPT_RETRAIN_CRON"):  # the cron is configurable; the default is what we snapshot
        expected_schedules["weekly_retraining"] = (os.environ["CLIPOPT_RETRAIN_CRON"], "UTC", "retraining_job")
    assert {s.name: (s.cron_schedule, s.execution_timezone, s.job_name) for s in defs.schedules} == expected_schedules
    assert {s.name: (s.job_name, s.minimum_interval_seconds) for s in defs.sensors} == SENSORS
    assert retraining_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert new_images_sensor.default_status == dg.DefaultSensorStatus.STOPPED

    job = defs.resolve_job_def("retraining_job")
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == set(GRAPH) - {
        "seed_sweep", "benchmark_suite", "table1_report"}  # the suite needs its own roots: never in the default job
    retried = {key.to_user_string(): assets.op.retry_policy for assets in ASSETS for key in assets.keys
               if assets.op.retry_policy}
    assert set(retried) == TRAINING_RETRIES and all(policy.max_retries >= 1 for policy in retried.values())


def test_gallery_embeddings_are_sharded_and_the_job_covers_every_shard(defs):
    from clipopt_dagster.partitions import ALL_SHARDS_TAGS, SHARD_COUNT

    graph = defs.resolve_asset_graph()
    partitioned = {key.to_user_string(): graph.get(key).partitions_def for key in graph.get_all_asset_keys()
                   if graph.get(key).partitions_def is not None}
    assert sorted(partitioned) == ["benchmark_suite", "gallery_embeddings"]
    from clipopt_core.suite.columns import COLUMN_NAMES

    assert partitioned["benchmark_suite"].get_partition_keys() == list(COLUMN_NAMES)  # one per Table 1 column
    keys = partitioned["gallery_embeddings"].get_partition_keys()
    assert keys == [f"{shard:05d}" for shard in range(SHARD_COUNT)] and SHARD_COUNT == 4  # default count
    assert graph.get(dg.AssetKey("gallery_embeddings")).backfill_policy == dg.BackfillPolicy.multi_run(1)
    assert defs.resolve_job_def("retraining_job").tags == ALL_SHARDS_TAGS == {
        "dagster/asset_partition_range_start": "00000", "dagster/asset_partition_range_end": "00003"}


@pytest.mark.parametrize("raw, expected", [(None, 4), ("16", 16), ("1", 1), ("0", None), ("-2", None), ("x", None),
                                           ("2.5", None), ("", None)])
def test_shard_count_comes_from_the_environment(raw, expected):
    from clipopt_dagster.partitions import shard_count

    environ = {} if raw is None else {"CLIPOPT_GALLERY_SHARDS": raw}
    if expected is None:
        with pytest.raises(ValueError, match="CLIPOPT_GALLERY_SHARDS must be a positive integer"):
            shard_count(environ)
    else:
        assert shard_count(environ) == expected


def test_schedule_requests_a_retraining_run():
    tick = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.timezone.utc)  # a Monday, 03:00 UTC
    context = dg.build_schedule_context(scheduled_execution_time=tick)
    data = retraining_schedule.evaluate_tick(context)
    assert data.skip_message is None
    assert len(data.run_requests) == 1
    request = data.run_requests[0]
    assert isinstance(request, dg.RunRequest)
    assert request.job_name in (None, "retraining_job") and retraining_schedule.job_name == "retraining_job"
    assert request.tags.get("dagster/schedule_name") == "weekly_retraining"


def _sensor_tick(instance: dg.DagsterInstance, cursor: str | None, resources: dict):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return new_images_sensor.evaluate_tick(context)


def _add_image(source: Path, label: str = "purple circle") -> None:
    """Copy an existing png under a new class folder and append its row to manifest.csv."""
    relative = f"{label.replace(' ', '_')}/0.png"
    (source / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "red_circle" / "0.png", source / relative)
    manifest = pl.read_csv(source / "manifest.csv")
    row = pl.DataFrame([{"path": relative, "label": label, "caption": f"a {label}", "category": "circle",
                         "source": "shapes-a"}], schema=manifest.schema)
    pl.concat([manifest, row]).write_csv(source / "manifest.csv")


def _sensor_world(tmp_path) -> tuple[Path, dict, dg.DagsterInstance]:
    """A small class-folder source, the sensor's resources, and an empty instance."""
    source = write_shapes_source(tmp_path / "shapes", per_class=2)
    resources = {"sources": DataSourceResource(images=str(source), captions=None),
                 "compute": ComputeResource(cache_dir=str(tmp_path / "cache"))}
    return source, resources, dg.DagsterInstance.ephemeral()


def test_new_images_sensor_requests_once_per_source_state(tmp_path):
    source, resources, instance = _sensor_world(tmp_path)

    first = _sensor_tick(instance, None, resources)
    assert len(first.run_requests) == 1 and first.skip_message is None
    run_key = first.run_requests[0].run_key
    fingerprint = first.run_requests[0].tags["clipopt/source_fingerprint"]
    assert first.cursor == f"{fingerprint}:1" and run_key == f"images-{fingerprint}-1"

    again = _sensor_tick(instance, first.cursor, resources)
    assert again.run_requests == [] and "unchanged" in again.skip_message
    with dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=resources) as context:
        assert isinstance(new_images_sensor(context), dg.SkipReason)

    _add_image(source)
    changed = _sensor_tick(instance, first.cursor, resources)
    assert len(changed.run_requests) == 1
    assert changed.run_requests[0].run_key != run_key and changed.cursor != first.cursor

    settled = _sensor_tick(instance, changed.cursor, resources)
    assert settled.run_requests == [] and "unchanged" in settled.skip_message

    # removing an image (one that was there from the start) is a new state too
    (source / "red_circle" / "1.png").unlink()
    pl.read_csv(source / "manifest.csv").filter(pl.col("path") != "red_circle/1.png").write_csv(source / "manifest.csv")
    removed = _sensor_tick(instance, changed.cursor, resources)
    assert len(removed.run_requests) == 1
    assert removed.run_requests[0].run_key not in (run_key, changed.run_requests[0].run_key)


def test_new_images_sensor_retrains_when_the_source_reverts(tmp_path):
    source, resources, instance = _sensor_world(tmp_path)
    state_a = _sensor_tick(instance, None, resources)
    _add_image(source)
    state_b = _sensor_tick(instance, state_a.cursor, resources)
    (source / "purple_circle" / "0.png").unlink()
    pl.read_csv(source / "manifest.csv").filter(pl.col("label") != "purple circle").write_csv(source / "manifest.csv")
    back_to_a = _sensor_tick(instance, state_b.cursor, resources)
    assert len(back_to_a.run_requests) == 1
    used = {state_a.run_requests[0].run_key, state_b.run_requests[0].run_key}
    assert back_to_a.run_requests[0].run_key not in used

def test_new_images_sensor_skips_the_state_already_trained_on(tmp_path):
    """No cursor (sensor reset), but raw_images was last materialised from this exact source state."""
    source, resources, instance = _sensor_world(tmp_path)
    fingerprint = _sensor_tick(instance, None, resources).run_requests[0].tags["clipopt/source_fingerprint"]
    instance.report_runless_asset_event(
        dg.AssetMaterialization("raw_images", tags={"dagster/data_version": fingerprint}))
    tick = _sensor_tick(instance, None, resources)
    assert tick.run_requests == [] and fingerprint in tick.skip_message
