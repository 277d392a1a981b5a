"""Retraining job, its weekly schedule, and a sensor that retrains when the image source changes."""

import os

import dagster as dg

from clipopt_core.data import sources as src
from clipopt_dagster.partitions import ALL_SHARDS_TAGS
from clipopt_dagster.resources import ComputeResource, DataSourceResource

retraining_job = dg.define_asset_job(
    "retraining_job",
    # the seed sweep and the benchmark suite (its own roots, its own partitions) run on request only
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets("seed_sweep") - dg.AssetSelection.groups("benchmark_suite"),
    description="Re-ingest the source, retrain every variant, re-evaluate, and rebuild the served index "
                "(every gallery shard in this one run).",
    tags=ALL_SHARDS_TAGS,
)

seed_sweep_job = dg.define_asset_job(
    "seed_sweep_job",
    selection=dg.AssetSelection.assets("seed_sweep"),
    description="Train every stage under each configured seed and report mean ± sd per variant "
                "(after the data assets; see configs/demo_seeds.yaml).",
)

retraining_schedule = dg.ScheduleDefinition(
    name="weekly_retraining",
    job=retraining_job,
    cron_schedule=os.environ.get("CLIPOPT_RETRAIN_CRON", "0 3 * * 1"),
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)


def last_trained_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """Data version of the latest ``raw_images`` materialisation (the source the models were trained on)."""
    event = instance.get_latest_materialization_event(dg.AssetKey("raw_images"))
    if event is None or event.asset_materialization is None:
        return None
    return (event.asset_materialization.tags or {}).get("dagster/data_version")


@dg.sensor(job=retraining_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
def new_images_sensor(context: dg.SensorEvaluationContext, sources: DataSourceResource,
                      compute: ComputeResource) -> dg.SensorResult | dg.SkipReason:
    """Request one retraining run per new state of the image source (added, changed or removed images).

    The cursor ``<fingerprint>:<n>`` holds the last state a run was requested for and how many
    runs were requested so far. The same state never requests twice; a state seen before
    (A → B → A) gets a fresh run key ``images-<fingerprint>-<n>``, so it is retrained too.
    """
    images, _ = sources.resolve(compute.cache, context.log.info)
    # stat-based: only files whose size/mtime (ETag) changed are read (clipopt_core.data.file_facts)
    fingerprint = src.fingerprint(images, sources.images_layout, cache_dir=compute.cache,
                                  workers=sources.ingest_workers)
    previous, requested = _parse_cursor(context.cursor)
    if fingerprint == previous or (previous is None and fingerprint == last_trained_fingerprint(context.instance)):
        return dg.SkipReason(f"image source unchanged (fingerprint {fingerprint})")
    count = requested + 1
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"images-{fingerprint}-{count}",
                                                       tags={"clipopt/source_fingerprint": fingerprint})],
                           cursor=f"{fingerprint}:{count}")


def _parse_cursor(cursor: str | None) -> tuple[str | None, int]:
    if not cursor:
        return None, 0
    fingerprint, _, count = cursor.rpartition(":")
    return (fingerprint, int(count)) if fingerprint and count.isdigit() else (cursor, 0)
