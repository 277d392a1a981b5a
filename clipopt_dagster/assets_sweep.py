"""The seed sweep: every stage trained under several seeds, one report of mean ± sd per variant.

Not part of ``retraining_job`` (it trains every stage N times): run ``seed_sweep_job`` after the
data assets, e.g. ``configs/demo_seeds.yaml`` for the demo. Seed runs publish under
``sweeps/seed-<n>/models`` (the served ``models/`` are untouched) and are input-addressed like
the training assets: a seed whose inputs did not change is reused, not retrained.
"""

import dagster as dg
import polars as pl

from clipopt_core.data.captions import caption_test_pairs
from clipopt_core.evaluate.seeds import seed_root, seed_summary, summary_markdown
from clipopt_core.evaluate.variants import evaluate_variants
from clipopt_core.layout import Keys
from clipopt_core.registry import BASELINE, STAGES
from clipopt_core.train.job import StageRequest, run_stage
from clipopt_dagster._helpers import GPU_POOL, md_table, step_logger
from clipopt_dagster.assets_data import base_model, caption_corpus, image_splits, pseudo_captions
from clipopt_dagster.configs import SeedSweepSettings
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource


@dg.asset(group_name="evaluation", deps=[base_model, image_splits, pseudo_captions, caption_corpus], code_version="1",
          pool=GPU_POOL, kinds={"pytorch"})
def seed_sweep(context: dg.AssetExecutionContext, config: SeedSweepSettings, compute: ComputeResource,
               store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Every stage under each seed of ``seeds``, evaluated on the test split; mean ± sd per variant and metric."""
    compute.setup_torch()
    artifacts = store.store()
    test = artifacts.read_parquet(Keys.splits).filter(pl.col("split") == "test")
    pairs = caption_test_pairs(artifacts.read_parquet(Keys.caption_pairs))

    def evaluate(variants: list[str], root: str) -> dict[str, dict[str, float]]:
        results = evaluate_variants(artifacts, variants, test, pairs, config.eval_config(), cache_dir=compute.cache,
                                    device=compute.device, root=root, log=context.log.info)
        return {variant: result.metrics for variant, result in results.items()}

    baseline = evaluate([BASELINE], seed_root(0))[BASELINE]
    per_seed, runs = {}, []
    for seed in config.seeds:
        for stage in STAGES:  # registry order: an encoder before its realignment
            request = StageRequest(asset=stage.asset, store_url=store.base_url, endpoint_url=store.endpoint_url,
                                   settings=config.stage_settings(stage.asset, seed), cache_dir=str(compute.cache),
                                   device=compute.device, model_root=seed_root(seed))
            metadata = run_stage(request, store=artifacts, log=step_logger(context), on_wait=context.log.warning)
            runs.append({"seed": seed, "stage": stage.asset, "reused": metadata["reused"],
                         "best_val_score": metadata.get("best_val_score", float("nan"))})
        per_seed[seed] = evaluate([stage.variant for stage in STAGES], seed_root(seed))
        context.log.info(f"seed {seed}: {per_seed[seed]}")
    summary = seed_summary(baseline, per_seed)
    markdown = summary_markdown(summary)
    artifacts.write_parquet(Keys.seed_report, summary)
    artifacts.write_bytes(Keys.seed_report_md, markdown.encode())
    return dg.MaterializeResult(metadata={"seeds": len(config.seeds), "summary": dg.MetadataValue.md(markdown),
                                          "runs": md_table(runs), "uri": artifacts.url(Keys.seed_report_md)})
