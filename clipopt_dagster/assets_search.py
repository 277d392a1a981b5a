"""The baseline's gallery index, published beside the served one so the search page can compare them."""

import time

import dagster as dg

from clipopt_core.layout import Keys
from clipopt_core.serve.champion import resolve_served
from clipopt_core.serve import shards as sharding
from clipopt_core.serve.search import BASELINE_PREFIX, lazy_image_embedder
from clipopt_dagster._helpers import GPU_POOL, md_table
from clipopt_dagster.assets_data import base_model, image_manifest
from clipopt_dagster.configs import IndexSettings
from clipopt_dagster.partitions import SHARD_COUNT
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource


@dg.asset(group_name="serving", deps=[base_model, image_manifest], code_version="1", pool=GPU_POOL,
          kinds={"pytorch", "faiss"})
def baseline_index(context: dg.AssetExecutionContext, config: IndexSettings, compute: ComputeResource,
                   store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Every manifest image embedded by the base model (shards as ``gallery_embeddings``; current shards
    skipped) and indexed like ``faiss_index``, under ``serving-baseline/``. ``clipopt serve`` offers it as
    the page's "baseline" variant."""
    compute.setup_torch()
    artifacts = store.store()
    manifest = artifacts.read_parquet(Keys.manifest)
    _, model_key, spec = resolve_served(artifacts, compute.cache, "baseline")
    embed = lazy_image_embedder(spec, compute.cache, device=compute.device)
    shards = []
    for shard in range(SHARD_COUNT):
        started = time.perf_counter()
        result = sharding.embed_shard(manifest, shard, SHARD_COUNT, artifacts, embed, model_key=model_key,
                                      prefix=BASELINE_PREFIX)
        shards.append({"shard": shard, "rows": result["rows"], "skipped": result["skipped"],
                       "seconds": round(time.perf_counter() - started, 2)})
    _, info = sharding.build_sharded_index(artifacts, SHARD_COUNT, config.core(), prefix=BASELINE_PREFIX)
    context.log.info(f"baseline index: {info['n']} vectors, recall@10 {info['recall_at_10']}")
    return dg.MaterializeResult(metadata={
        **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}, "model_key": model_key,
        "embedded_shards": sum(not s["skipped"] for s in shards), "shards": md_table(shards),
        "uri": artifacts.url(sharding.index_key(BASELINE_PREFIX, "merged.faiss"))})
