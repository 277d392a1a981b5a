"""Evaluation report over every variant, then embeddings and a faiss index for the served variant."""

import time

import dagster as dg
import numpy as np
import polars as pl

from clipopt_core import index as faiss_index_lib
from clipopt_core.embed import embed_images
from clipopt_core.evaluation import evaluate_model
from clipopt_core.models import load_model
from clipopt_core.report import gallery_image, report_frame, teaser_plot, to_markdown
from clipopt_core.layout import VARIANT_MODELS, Keys, variant_spec
from clipopt_dagster._helpers import GPU_POOL, md_table, png_markdown
from clipopt_dagster.assets_training import mcip_encoder, realigned_2sft, realigned_mcip, retrieval_encoder
from clipopt_dagster.configs import EvalSettings, IndexSettings
from clipopt_dagster.resources import ArtifactStoreResource, CatalogResource, ComputeResource

@dg.asset(group_name="evaluation", deps=[retrieval_encoder, realigned_2sft, mcip_encoder, realigned_mcip],
          code_version="1", pool=GPU_POOL, kinds={"pytorch", "duckdb"})
def evaluation_report(context: dg.AssetExecutionContext, config: EvalSettings, compute: ComputeResource,
                      store: ArtifactStoreResource, catalog: CatalogResource) -> dg.MaterializeResult:
    """Every variant × every metric on the held-out test split, with deltas to the baseline."""
    compute.setup_torch()
    artifacts = store.store()
    test = artifacts.read_parquet(Keys.splits).filter(pl.col("split") == "test")
    metrics, embeddings, per_source = {}, {}, {}
    for variant in ("baseline", *VARIANT_MODELS):
        started = time.perf_counter()
        bundle = load_model(variant_spec(artifacts, variant, compute.cache), cache_dir=compute.cache, device=compute.device)
        result = evaluate_model(bundle, test, config.core(), device=compute.device)
        metrics[variant], embeddings[variant], per_source[variant] = result.metrics, result.image_embeddings, result.per_source
        context.log.info(f"{variant}: {result.metrics} ({time.perf_counter() - started:.1f}s)")
    frame = report_frame(metrics)
    run_id = context.run.run_id
    artifacts.write_parquet(Keys.report, frame)
    artifacts.write_json(Keys.report_json, {"run_id": run_id, "metrics": metrics, "per_source_i2i_map": per_source,
                                            "serve_variant": config.serve_variant,
                                            "alignment_tolerance": config.alignment_tolerance,
                                            "min_i2i_gain": config.min_i2i_gain, "test_images": test.height})
    markdown = to_markdown(frame)
    artifacts.write_bytes(Keys.report_md, markdown.encode())
    teaser = teaser_plot(frame)
    artifacts.write_bytes(Keys.teaser, teaser)
    queries = np.linspace(0, test.height - 1, num=min(3, test.height)).astype(int).tolist()
    gallery = gallery_image(test["uri"].to_list(), embeddings, queries)
    artifacts.write_bytes(Keys.gallery, gallery)
    history_rows = catalog.append_report(frame.select([c for c in frame.columns if not c.startswith("delta")])
                                         .with_columns(pl.lit(run_id).alias("run_id"),
                                                       pl.lit(time.time()).alias("created_at"),
                                                       pl.lit(test.height).alias("test_images")))
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(markdown), "teaser": png_markdown(teaser, "I2I vs T2I"),
        "gallery": png_markdown(gallery, "top-5 neighbours per variant"),
        "per_source_i2i_map": md_table([{"variant": v, **s} for v, s in per_source.items() if s]),
        "report_uri": artifacts.url(Keys.report_md), "test_images": test.height, "history_rows": history_rows,
    })


@dg.asset(group_name="serving", deps=[evaluation_report], code_version="1", pool=GPU_POOL, kinds={"pytorch", "parquet"})
def gallery_embeddings(context: dg.AssetExecutionContext, compute: ComputeResource,
                       store: ArtifactStoreResource) -> dg.MaterializeResult:
    """One embedding per image of the whole manifest, from the variant the report says to serve."""
    compute.setup_torch()
    artifacts = store.store()
    variant = artifacts.read_json(Keys.report_json)["serve_variant"]
    manifest = artifacts.read_parquet(Keys.manifest)
    bundle = load_model(variant_spec(artifacts, variant, compute.cache), cache_dir=compute.cache, device=compute.device)
    vectors = embed_images(bundle, manifest["uri"].to_list(), device=compute.device)
    frame = manifest.select("image_id", "uri", "label", "caption", "source").with_columns(
        pl.Series("embedding", vectors.numpy(), dtype=pl.Array(pl.Float32, vectors.shape[1])))
    artifacts.write_parquet(Keys.embeddings, frame)
    return dg.MaterializeResult(metadata={"variant": variant, "images": frame.height, "dim": int(vectors.shape[1]),
                                          "uri": artifacts.url(Keys.embeddings)})


@dg.asset(group_name="serving", deps=[gallery_embeddings], code_version="1", kinds={"faiss"})
def faiss_index(config: IndexSettings, store: ArtifactStoreResource) -> dg.MaterializeResult:
    """A faiss inner-product index over the gallery embeddings, with recall@10 vs exact search measured."""
    artifacts = store.store()
    frame = artifacts.read_parquet(Keys.embeddings)
    vectors = np.ascontiguousarray(frame["embedding"].to_numpy(), dtype=np.float32)
    index, info = faiss_index_lib.build_index(vectors, config.core())
    recall = faiss_index_lib.recall_at_k_vs_exact(index, vectors, k=min(10, len(vectors) - 1))
    info = {**info, "recall_at_10": recall, "count": int(index.ntotal), "dim": int(vectors.shape[1]),
            "target_recall": config.target_recall}
    artifacts.write_bytes(Keys.index, faiss_index_lib.serialize_index(index))
    artifacts.write_json(Keys.index_info, info)
    return dg.MaterializeResult(metadata={**{k: v for k, v in info.items() if isinstance(v, (int, float, str))},
                                          "uri": artifacts.url(Keys.index)})
