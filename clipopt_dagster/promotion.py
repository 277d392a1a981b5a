"""Serve only what passed, on the Dagster side: the served variant's embeddings need a passing report.

The report's blocking checks stop ``gallery_embeddings`` in the run that evaluates; a later run of
``gallery_embeddings`` alone (a backfill, a sensor) would otherwise embed the gallery with a variant
that failed them. :func:`refuse_unless_report_passed` reads the latest evaluation of each report check
from the instance and fails the step, before anything is written, when one of them failed.
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


def refuse_unless_report_passed(context: dg.AssetExecutionContext, variant: str) -> None:
    """Raise :class:`dg.Failure` when the latest report failed a check: its variant is not published."""
    failed = failed_report_checks(context.instance)
    if failed:
        raise dg.Failure(
            f"not publishing gallery embeddings of {variant!r}: the latest evaluation_report failed {', '.join(failed)}. "
            "Fix the training or the report thresholds and re-materialise evaluation_report (with its checks) first.",
            metadata={"variant": variant, "failed_checks": ", ".join(failed)})
