"""Asset checks: manifest validity, alignment preserved, retrieval improved, index recall."""

import math

import dagster as dg

from clipopt_core.layout import Keys
from clipopt_core.serve.promotion import served_info
from clipopt_core.serve.shards import STAGING_FOLDER, index_key
from clipopt_dagster.assets_data import image_manifest
from clipopt_dagster.assets_serving import evaluation_report, faiss_index
from clipopt_dagster.resources import ArtifactStoreResource

MAX_REJECTED_SHARE = 0.5
FLOAT_SLACK = 1e-9  # metric differences at exactly the tolerance must pass despite rounding


@dg.asset_check(asset=image_manifest, blocking=True, description="≥ 2 classes with ≥ 2 images, and under half the rows rejected")
def manifest_valid(store: ArtifactStoreResource) -> dg.AssetCheckResult:
    artifacts = store.store()
    accepted, rejected = artifacts.read_parquet(Keys.manifest), artifacts.read_parquet(Keys.rejected)
    usable = int((accepted.group_by("label").len()["len"] >= 2).sum())
    share = rejected.height / max(accepted.height + rejected.height, 1)
    return dg.AssetCheckResult(passed=usable >= 2 and share < MAX_REJECTED_SHARE,
                               metadata={"classes_with_2_plus_images": usable, "rejected_share": round(share, 4)})


ALIGNMENT_METRICS = {"t2i_r5": "t2i_cls_r5", "zs_top1": None}  # metric -> fallback when it was not measured


def _served(store: ArtifactStoreResource) -> tuple[dict, str]:
    report = store.store().read_json(Keys.report_json)
    return report, report["serve_variant"]


def _delta(report: dict, variant: str, metric: str) -> tuple[float, float, float]:
    """``(point delta, lower, upper)`` of ``metric`` for ``variant`` vs the baseline; bounds are the report's
    paired-bootstrap interval (a report without intervals counts the point delta as its own interval)."""
    delta = report["metrics"][variant][metric] - report["metrics"]["baseline"][metric]
    lo, hi = report.get("intervals", {}).get(variant, {}).get(f"delta_{metric}", (delta, delta))
    return delta, lo, hi


def _measured(report: dict, metric: str) -> bool:
    value = report["metrics"]["baseline"].get(metric)
    return value is not None and not math.isnan(value)


@dg.asset_check(asset=evaluation_report, blocking=True,
                description="served variant: T2I R@5 (held-out pairs) and zero-shot top-1 not significantly below "
                            "the baseline by more than the tolerance")
def alignment_preserved(store: ArtifactStoreResource) -> dg.AssetCheckResult:
    """Blocks when, for T2I R@5 or zero-shot top-1, the drop is significant (upper bound of the 95% paired-
    bootstrap interval of the delta < 0) AND the point drop exceeds ``alignment_tolerance``. T2I falls back
    to the class-caption R@5 when no held-out caption pairs were measured."""
    report, variant = _served(store)
    tolerance = report["alignment_tolerance"]
    metadata: dict = {"variant": variant, "tolerance": tolerance}
    blocked = []
    for metric, fallback in ALIGNMENT_METRICS.items():
        if not _measured(report, metric) and fallback:
            metric = fallback
        delta, lo, hi = _delta(report, variant, metric)
        if hi < 0 and delta < -tolerance - FLOAT_SLACK:
            blocked.append(metric)
        metadata.update({f"delta_{metric}": round(delta, 4), f"delta_{metric}_ci": f"[{lo:+.4f}, {hi:+.4f}]"})
    metadata["blocked_by"] = ", ".join(blocked) or "none"
    return dg.AssetCheckResult(passed=not blocked, metadata=metadata)


@dg.asset_check(asset=evaluation_report, blocking=True,
                description="served variant: I2I mAP gain over the baseline above min_i2i_gain at 95% confidence")
def retrieval_improved(store: ArtifactStoreResource) -> dg.AssetCheckResult:
    """Passes when the lower bound of the 95% paired-bootstrap interval of the I2I mAP delta exceeds ``min_i2i_gain``."""
    report, variant = _served(store)
    delta, lo, hi = _delta(report, variant, "i2i_map")
    return dg.AssetCheckResult(passed=lo > report["min_i2i_gain"],
                               metadata={"variant": variant, "delta_i2i_map": round(delta, 4),
                                         "delta_i2i_map_ci": f"[{lo:+.4f}, {hi:+.4f}]",
                                         "min_i2i_gain": report["min_i2i_gain"]})


@dg.asset_check(asset=faiss_index, blocking=True,
                description="the index just built: recall@10 vs exact search ≥ the target, so it was promoted to serving")
def index_recall(store: ArtifactStoreResource) -> dg.AssetCheckResult:
    """Reports the staged candidate and what is served now (promoted, or the earlier index kept)."""
    artifacts = store.store()
    candidate = artifacts.read_json(index_key(Keys.serving, "info.json", STAGING_FOLDER))
    served = served_info(artifacts, Keys.serving)
    passed = candidate["recall_at_10"] >= candidate["target_recall"]
    return dg.AssetCheckResult(passed=passed, metadata={
        "recall_at_10": round(candidate["recall_at_10"], 4), "target": candidate["target_recall"],
        "kind": candidate.get("kind", ""), "promoted": passed,
        "served_recall_at_10": round(served["recall_at_10"], 4) if served else "none served",
        "served_n": served["n"] if served else 0})
