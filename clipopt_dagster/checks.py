"""Asset checks: manifest validity, alignment preserved, retrieval improved, index recall."""

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


def _served(store: ArtifactStoreResource) -> tuple[dict, dict, dict]:
    report = store.store().read_json(Keys.report_json)
    return report, report["metrics"]["baseline"], report["metrics"][report["serve_variant"]]


@dg.asset_check(asset=evaluation_report, blocking=True,
                description="served variant: T2I R@5 and zero-shot top-1 not below baseline − tolerance")
def alignment_preserved(store: ArtifactStoreResource) -> dg.AssetCheckResult:
    report, baseline, served = _served(store)
    tolerance = report["alignment_tolerance"]
    deltas = {m: served[m] - baseline[m] for m in ("t2i_r5", "zs_top1")}
    return dg.AssetCheckResult(passed=all(d >= -tolerance - FLOAT_SLACK for d in deltas.values()),
                               metadata={"variant": report["serve_variant"], "tolerance": tolerance,
                                         **{f"delta_{m}": round(d, 4) for m, d in deltas.items()}})


@dg.asset_check(asset=evaluation_report, blocking=True,
                description="served variant: I2I mAP above the baseline by more than min_i2i_gain")
def retrieval_improved(store: ArtifactStoreResource) -> dg.AssetCheckResult:
    report, baseline, served = _served(store)
    delta = served["i2i_map"] - baseline["i2i_map"]
    return dg.AssetCheckResult(passed=delta > report["min_i2i_gain"],
                               metadata={"variant": report["serve_variant"], "delta_i2i_map": round(delta, 4),
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
