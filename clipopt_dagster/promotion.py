"""Serve only what passed, on the Dagster side: the latest evaluation of the report's checks.

The report's blocking checks stop ``served_model`` in the run that evaluates; a later run of
``served_model`` alone (a backfill, a sensor) reads :func:`failed_report_checks` from the instance and
refuses the challenger (the champion keeps serving) when one of them failed.
"""
import dagster as dg

REPORT_ASSET = dg.AssetKey("evaluation_report")
REPORT_CHECKS = ("alignment_preserved", "retrieval_improved")  # clipopt_dagster.checks (tested to match)


def failed_report_checks(instance: dg.DagsterInstance) -> list[str]:
    """Names of the report checks whose latest evaluation failed (a check never evaluated does not count)."""
    failed = []
    for name in REPORT_CHECKS:
        record = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(REPORT_ASSET, name))
        if record is not None and record.status.value == "FAILED":
            failed.append(name)
    return failed
