"""Evaluation report over every variant, then embeddings and a faiss index for the served variant."""

import dataclasses
import os
import time

import dagster as dg
import polars as pl

from clipopt_core.serve import shards as sharding
from clipopt_core.data.captions import caption_test_pairs
from clipopt_core.evaluate.bootstrap import paired_bootstrap, per_query_frame
from clipopt_core.evaluate.protocol import QUERY_SETS
from clipopt_core.evaluate.variants import evaluate_variants
from clipopt_core.evaluate.report import (neighbour_gallery_image, report_frame, teaser_plot, text_gallery_image,
                                         to_markdown)
from clipopt_core.serve.champion import CHAMPION_KEY, champion_spec
from clipopt_core.serve.champion import current as current_champion
from clipopt_core.serve.promotion import build_and_promote
from clipopt_core.serve.search import lazy_image_embedder
from clipopt_core.layout import Keys
from clipopt_core.runtime.digest import frame_digest
from clipopt_core.registry import VARIANTS
from clipopt_dagster._helpers import GPU_POOL, md_table, png_markdown
from clipopt_dagster.assets_data import caption_corpus
from clipopt_dagster.assets_training import TRAINING_ASSETS
from clipopt_dagster.configs import EvalSettings, IndexSettings
from clipopt_dagster.partitions import GALLERY_SHARDS, SHARD_COUNT
from clipopt_dagster.resources import ArtifactStoreResource, CatalogResource, ComputeResource

@dg.asset(group_name="evaluation", deps=[*TRAINING_ASSETS, caption_corpus], code_version="3", pool=GPU_POOL,
          kinds={"pytorch", "duckdb"})
def evaluation_report(context: dg.AssetExecutionContext, config: EvalSettings, compute: ComputeResource,
                      store: ArtifactStoreResource, catalog: CatalogResource) -> dg.MaterializeResult:
    """Every variant × every metric on the held-out test split and the held-out caption pairs, with
    paired-bootstrap 95% intervals on every metric and every delta to the baseline."""
    compute.setup_torch()
    artifacts = store.store()
    test = artifacts.read_parquet(Keys.splits).filter(pl.col("split") == "test")
    pairs = caption_test_pairs(artifacts.read_parquet(Keys.caption_pairs))
    results = evaluate_variants(artifacts, VARIANTS, test, pairs, config.core(), cache_dir=compute.cache,
                                device=compute.device, log=context.log.info)
    metrics = {variant: result.metrics for variant, result in results.items()}
    neighbours = {variant: result.i2i_examples for variant, result in results.items()}
    per_source = {variant: result.per_source for variant, result in results.items()}
    per_query = {variant: result.per_query for variant, result in results.items()}
    examples = {variant: result.t2i_examples for variant, result in results.items()}
    intervals = paired_bootstrap(per_query, QUERY_SETS, config=config.bootstrap())
    frame = report_frame(metrics, intervals)
    run_id = context.run.run_id
    artifacts.write_parquet(Keys.report, frame)
    artifacts.write_parquet(Keys.per_query, per_query_frame(per_query))
    artifacts.write_json(Keys.report_json, {
        "run_id": run_id, "metrics": metrics, "intervals": intervals, "per_source_i2i_map": per_source,
        "bootstrap": {"resamples": config.bootstrap_resamples, "confidence": config.confidence,
                      "seed": config.bootstrap_seed, "method": "paired percentile bootstrap over queries"},
        "eval_config": dataclasses.asdict(config.core()),
        "serve_variant": config.serve_variant, "alignment_tolerance": config.alignment_tolerance,
        "min_i2i_gain": config.min_i2i_gain, "test_images": test.height, "test_caption_pairs": pairs.height,
        "test_fingerprint": frame_digest(test),
        "test_caption_queries": len(per_query["baseline"]["t2i_r5"])})
    markdown = to_markdown(frame)
    artifacts.write_bytes(Keys.report_md, markdown.encode())
    teaser = teaser_plot(frame)
    artifacts.write_bytes(Keys.teaser, teaser)
    gallery = neighbour_gallery_image(test["uri"].to_list(), neighbours)
    artifacts.write_bytes(Keys.gallery, gallery)
    gallery_t2i = text_gallery_image(examples)
    artifacts.write_bytes(Keys.gallery_t2i, gallery_t2i)
    history_rows = catalog.append_report(frame.with_columns(
        pl.lit(run_id).alias("run_id"), pl.lit(time.time()).alias("created_at"), pl.lit(test.height).alias("test_images"),
        pl.lit(pairs.height).alias("test_caption_pairs")))
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(markdown), "teaser": png_markdown(teaser, "I2I vs T2I"),
        "gallery": png_markdown(gallery, "top-5 neighbours per variant"),
        "gallery_t2i": png_markdown(gallery_t2i, "top-5 images per held-out caption and variant"),
        "per_source_i2i_map": md_table([{"variant": v, **s} for v, s in per_source.items() if s]),
        "report_uri": artifacts.url(Keys.report_md), "test_images": test.height, "test_caption_pairs": pairs.height,
        "history_rows": history_rows,
    })


@dg.asset(group_name="serving", deps=[dg.AssetKey("served_model")], code_version="3", pool=GPU_POOL,
          kinds={"pytorch", "parquet"}, partitions_def=GALLERY_SHARDS, backfill_policy=dg.BackfillPolicy.multi_run(1))
def gallery_embeddings(context: dg.AssetExecutionContext, compute: ComputeResource,
                       store: ArtifactStoreResource) -> dg.MaterializeResult:
    """One embedding per image of the manifest, from the champion (``served_model``), one file per shard.

    A backfill runs one shard per run (fanned out by the run launcher); ``retraining_job`` covers every
    shard in one run. A shard already embedded by the same weights for the same images is skipped.
    Only a crowned champion is embedded: a variant that failed the report checks, or lost to the
    champion, never is (:mod:`clipopt_dagster.assets_release`).
    """
    compute.setup_torch()
    artifacts = store.store()
    champion = current_champion(artifacts)
    if champion is None:
        raise dg.Failure(f"no model serves yet ({artifacts.url(CHAMPION_KEY)} is missing): materialise served_model "
                         "after an evaluation_report that passes its checks")
    variant, model_key = champion.variant, champion.model_key
    manifest = artifacts.read_parquet(Keys.manifest)
    embed = lazy_image_embedder(lambda: champion_spec(artifacts, champion, compute.cache), compute.cache,
                                device=compute.device)  # batch fits GPU memory
    shards = []
    for key in context.partition_keys:
        started = time.perf_counter()
        result = sharding.embed_shard(manifest, int(key), SHARD_COUNT, artifacts, embed, model_key=model_key,
                                      prefix=Keys.serving)
        shards.append({"shard": key, "rows": result["rows"], "skipped": result["skipped"],
                       "seconds": round(time.perf_counter() - started, 2)})
        context.log.info(f"shard {key}: {result['rows']} images ({'unchanged, skipped' if result['skipped'] else 'embedded'})")
    return dg.MaterializeResult(metadata={
        "variant": variant, "model_key": model_key, "images": sum(s["rows"] for s in shards),
        "embedded_shards": sum(not s["skipped"] for s in shards), "shards": md_table(shards),
        "uri": artifacts.url(sharding.shard_key(Keys.serving, int(context.partition_keys[0]), SHARD_COUNT))})


@dg.asset(group_name="serving", deps=[gallery_embeddings], code_version="2", kinds={"faiss"})
def faiss_index(context: dg.AssetExecutionContext, config: IndexSettings,
                store: ArtifactStoreResource) -> dg.MaterializeResult:
    """One faiss inner-product index over every gallery shard (quantiser trained once, shards added and
    merged), with recall@10 vs exact search measured on held-out vectors.

    It is built into ``serving/index-staging/`` and promoted to the served ``serving/index/`` only when
    recall@10 ≥ ``target_recall`` (:mod:`clipopt_core.serve.promotion`); a refused build leaves the
    served index untouched and the ``index_recall`` check fails.
    """
    artifacts = store.store()
    info, outcome = build_and_promote(artifacts, SHARD_COUNT, config.core(), Keys.serving)
    (context.log.info if outcome.promoted else context.log.warning)(f"index {outcome.reason}")
    return dg.MaterializeResult(metadata={**{k: v for k, v in info.items() if isinstance(v, (int, float, str))},
                                          **outcome.metadata(), "uri": artifacts.url(Keys.index),
                                          "staging_uri": artifacts.url(sharding.index_key(
                                              Keys.serving, "merged.faiss", sharding.STAGING_FOLDER)),
                                          **({"service": dg.MetadataValue.url(os.environ["CLIPOPT_SERVE_URL"])}
                                             if os.environ.get("CLIPOPT_SERVE_URL") else {})})
