"""Which model serves: the champion, replaced by a retrained challenger only when it is not significantly worse.

See :mod:`clipopt_core.serve.champion` and ``docs/method.md#champion-and-challenger``. Every decision
(promote, refuse, keep) is a row of the catalogue's ``served_models`` table; ``clipopt rollback``
restores an earlier champion from it.
"""
import dagster as dg
import polars as pl

from clipopt_core.data.captions import caption_test_pairs
from clipopt_core.evaluate.bootstrap import BootstrapConfig, variant_scores
from clipopt_core.evaluate.protocol import EvalConfig, evaluate_model
from clipopt_core.layout import Keys, served_model_key
from clipopt_core.models.loading import load_model
from clipopt_core.runtime.catalog import SERVED_HISTORY
from clipopt_core.serve import champion as release
from clipopt_core.runtime.digest import frame_digest
from clipopt_dagster._helpers import GPU_POOL

BOOTSTRAP_FIELDS = ("resamples", "confidence", "seed")
from clipopt_dagster.assets_serving import evaluation_report
from clipopt_dagster.configs import ReleaseSettings
from clipopt_dagster.promotion import failed_report_checks
from clipopt_dagster.resources import ArtifactStoreResource, CatalogResource, ComputeResource


@dg.asset(group_name="serving", deps=[evaluation_report], code_version="1", pool=GPU_POOL, kinds={"pytorch", "duckdb"})
def served_model(context: dg.AssetExecutionContext, config: ReleaseSettings, compute: ComputeResource,
                 store: ArtifactStoreResource, catalog: CatalogResource) -> dg.MaterializeResult:
    """Crown the report's ``serve_variant`` (the challenger) or keep the champion, and record why.

    First model: crowned when the report passed its checks (else nothing can serve: the step fails).
    Later: refused when the report failed a check; kept when the weights are the champion's own;
    otherwise the champion's scores on the current test split (the report's own while its weights are
    still published, else measured afresh: :func:`clipopt_core.serve.champion.champion_scores`) and the
    challenger's are compared with the report's paired bootstrap (:func:`clipopt_core.serve.champion.judge`).
    A report measured on another split than the current one is refused: the step fails.
    """
    compute.setup_torch()
    artifacts = store.store()
    report = artifacts.read_json(Keys.report_json)
    variant, champion = report["serve_variant"], release.current(artifacts)
    test = artifacts.read_parquet(Keys.splits).filter(pl.col("split") == "test")
    fingerprint, challenger_key = frame_digest(test), served_model_key(artifacts, variant)
    if report.get("test_fingerprint") != fingerprint:
        raise dg.Failure("the latest evaluation_report was measured on another test split than image_splits holds "
                         "now; re-materialise evaluation_report before served_model",
                         metadata={"report_split": str(report.get("test_fingerprint"))[:16], "split": fingerprint[:16]})
    failed, deltas, afresh = failed_report_checks(context.instance), {}, False
    if failed and champion is None:
        raise dg.Failure(f"nothing can serve yet: {variant!r} failed {', '.join(failed)} of the latest "
                         "evaluation_report. "
                         "Fix the training or the report thresholds and re-materialise evaluation_report first.",
                         metadata={"variant": variant, "failed_checks": ", ".join(failed)})
    if failed:
        promote, reason = False, f"refused: the latest evaluation_report failed {', '.join(failed)}"
    elif champion is None:
        promote, reason = True, "promoted: the first model to pass the report checks"
    elif champion.model_key == challenger_key:
        promote, reason = False, "kept: the challenger's weights are the champion's"
    else:
        report_scores = artifacts.read_parquet(Keys.per_query)
        def evaluate() -> dict:
            return _evaluate_champion(context, artifacts, champion, report, test, compute)

        held, afresh = release.champion_scores(artifacts, champion, report_scores, evaluate)
        verdict = release.judge(variant_scores(report_scores, variant), held, tolerance=config.tolerance,
                                config=BootstrapConfig(**{k: report["bootstrap"][k] for k in BOOTSTRAP_FIELDS}))
        promote, reason, deltas = verdict.promote, verdict.reason, verdict.deltas
    if promote:
        champion = release.crown(artifacts, variant, data_fingerprint=fingerprint, report_id=report["run_id"])
    (context.log.info if promote or reason.startswith("kept") else context.log.warning)(reason)
    action = "promote" if promote else reason.split(":", 1)[0]
    rows = catalog.catalog().append(SERVED_HISTORY, release.history_row(action, context.run.run_id, challenger_key,
                                                                        reason, champion))
    return dg.MaterializeResult(metadata={
        "promoted": promote, "decision": reason, "champion": champion.model_key, "challenger": challenger_key,
        "champion_report_id": champion.report_id, "data_fingerprint": fingerprint[:16], "history_rows": rows,
        "champion_measured_afresh": afresh,
        **{f"delta_{m}": f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, (d, lo, hi) in deltas.items()}})


def _evaluate_champion(context: dg.AssetExecutionContext, artifacts, champion: release.ServedModel, report: dict,
                       test: pl.DataFrame, compute: ComputeResource) -> dict:
    """Per-query scores of the champion's archived weights on the current test split, measured as the report
    measured."""
    context.log.info(f"evaluating the champion {champion.model_key} on the current test split")
    bundle = load_model(release.champion_spec(artifacts, champion, compute.cache), cache_dir=compute.cache,
                        device=compute.device)
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in report["eval_config"].items()}
    pairs = caption_test_pairs(artifacts.read_parquet(Keys.caption_pairs))
    return evaluate_model(bundle, test, EvalConfig(**settings), caption_pairs=pairs, device=compute.device).per_query

