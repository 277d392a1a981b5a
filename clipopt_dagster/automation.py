"""Retraining job, its weekly schedule, and a sensor that retrains when the image source changes."""

import os

import dagster as dg

from clipopt_core import manifest as mf
from clipopt_dagster.resources import ComputeResource, DataSourceResource

retraining_job = dg.define_asset_job(
    "retraining_job",
    selection=dg.AssetSelection.all(),
    description="Re-ingest the source, retrain every variant, re-evaluate, and rebuild the served index.",
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

    The cursor holds the last state a run was requested for; the run key is the state's
    fingerprint, so re-evaluating the same state never launches a duplicate run.
    """
    images, _ = sources.resolve(compute.cache, context.log.info)
    fingerprint = mf.source_fingerprint(mf.scan_source(images, sources.images_layout), images)
    if fingerprint == context.cursor or fingerprint == last_trained_fingerprint(context.instance):
        return dg.SkipReason(f"image source unchanged (fingerprint {fingerprint})")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"images-{fingerprint}",
                                                       tags={"clipopt/source_fingerprint": fingerprint})],
                           cursor=fingerprint)
