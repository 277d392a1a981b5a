"""Data assets: raw images → validated manifest → class-disjoint splits; caption corpus; base model; pseudo-captions."""

import tempfile
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import polars as pl

from clipopt_core.data import manifest as mf
from clipopt_core.data import sources as src
from clipopt_core.data.ingest_stream import ingest_to_files
from clipopt_core.models.loading import load_model
from clipopt_core.data.caption_shards import PAIR_SCHEMA, is_shard_source, read_caption_shards
from clipopt_core.data.captions import caption_pool, split_caption_pairs
from clipopt_core.train.mining import mine_captions, mining_spec
from clipopt_core.train.text_pool import open_stored_pool
from clipopt_core.runtime.digest import frame_digest
from clipopt_core.train.identity import weights_digest
from clipopt_core.train.mining import similarity_histogram
from clipopt_core.layout import Keys, base_spec
from clipopt_dagster._helpers import GPU_POOL, md_table
from clipopt_dagster.configs import BaseModelConfig, MiningSettings, SplitConfig
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource, DataSourceResource

GROUP = "data"


@dg.asset(group_name=GROUP, code_version="2", kinds={"polars"})
def raw_images(context: dg.AssetExecutionContext, sources: DataSourceResource, compute: ComputeResource,
               store: ArtifactStoreResource) -> dg.MaterializeResult:
    """The rows of the image source (class folders, manifest, tar shards or a sources file), unvalidated;
    versioned by content (files whose signature is unchanged are not read again).

    Folders and manifests are listed once, a batch at a time, into a local file with the fingerprint
    computed from the same pass (:func:`clipopt_core.data.sources.write_listing`), uploaded only when
    complete (docs/scaling.md, "Source listing in batches")."""
    images, _ = sources.resolve(compute.cache, context.log.info)
    artifacts = store.store()
    stale = artifacts.remove_stale_temp_objects()  # temp objects of uploads killed in earlier runs
    with tempfile.TemporaryDirectory(prefix="raw-images-", dir=compute.cache) as work:
        listing = Path(work) / "listing.parquet"
        summary = src.write_listing(images, sources.images_layout, listing, cache_dir=compute.cache,
                                    workers=sources.ingest_workers)
        rows = pl.scan_parquet(listing)
        labels = rows.select(pl.col("label").n_unique()).collect(engine="streaming").item()
        per_source = rows.group_by("source").len().sort("source").collect(engine="streaming")
        artifacts.put_file(listing, Keys.listing)
    return dg.MaterializeResult(
        metadata={"source": images, "rows": summary.rows, "labels": labels, "fingerprint": summary.fingerprint,
                  "per_source": md_table(per_source), "stale_temp_objects_removed": len(stale)},
        data_version=dg.DataVersion(summary.fingerprint),
    )


@dg.asset(group_name=GROUP, deps=[raw_images], code_version="2", kinds={"polars"})
def image_manifest(context: dg.AssetExecutionContext, sources: DataSourceResource, compute: ComputeResource,
                   store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Every image decoded and validated; bad rows go to ``data/rejected.parquet`` with their reason.

    Streamed (:func:`clipopt_core.data.ingest_stream.ingest_to_files`): the listing is validated a batch at
    a time into local files, published only when complete; memory does not grow with the rows
    (docs/scaling.md, "Ingest in batches")."""
    artifacts = store.store()

    def _progress(done: int, total: int) -> None:
        if done % 500 == 0:
            context.log.info(f"validated {done}/{total} images")

    with tempfile.TemporaryDirectory(prefix="image-manifest-", dir=compute.cache) as work:
        folder = Path(work)
        listing = artifacts.get_file(Keys.listing, folder / "listing.parquet")
        accepted, rejected = folder / "manifest.parquet", folder / "rejected.parquet"
        summary = ingest_to_files(listing, accepted, rejected, cache_dir=compute.cache, workers=sources.ingest_workers,
                                  progress=_progress)
        stats, per_source = mf.class_stats(pl.scan_parquet(accepted)), src.source_counts(pl.scan_parquet(accepted))
        reasons = pl.scan_parquet(rejected).group_by("reason").len().sort("len", descending=True).collect()
        artifacts.put_file(rejected, Keys.rejected)
        artifacts.put_file(accepted, Keys.manifest)
    return dg.MaterializeResult(
        metadata={**stats, "rejected": summary.rejected_rows, "rejected_by_reason": md_table(reasons),
                  "uri": artifacts.url(Keys.manifest), "per_source": md_table(per_source)},
        data_version=dg.DataVersion(summary.digest),
    )


@dg.asset(group_name=GROUP, deps=[image_manifest], code_version="1", kinds={"polars"})
def image_splits(config: SplitConfig, store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Class-disjoint train / val / test splits (val selects checkpoints; test is only for the report)."""
    artifacts = store.store()
    splits = mf.split_by_class(artifacts.read_parquet(Keys.manifest), val_fraction=config.val_fraction,
                               test_fraction=config.test_fraction, seed=config.seed)
    for name in ("train", "val", "test"):
        if splits.filter(pl.col("split") == name).height == 0 and (name != "val" or config.val_fraction > 0):
            raise dg.Failure(f"split {name!r} is empty: the source has too few classes for "
                             f"val_fraction={config.val_fraction}, test_fraction={config.test_fraction}")
    artifacts.write_parquet(Keys.splits, splits)
    counts = splits.group_by("split").agg(pl.len().alias("images"), pl.col("label").n_unique().alias("classes"))
    per_source = splits.group_by("split", "source").agg(pl.len().alias("images"), pl.col("label").n_unique().alias("classes"))
    return dg.MaterializeResult(metadata={"splits": md_table(counts.sort("split")), "uri": artifacts.url(Keys.splits),
                                          "per_source": md_table(per_source.sort("split", "source"))},
                                data_version=dg.DataVersion(frame_digest(splits)))


@dg.asset(group_name=GROUP, deps=[image_splits], code_version="3", kinds={"polars"})
def caption_corpus(context: dg.AssetExecutionContext, config: SplitConfig, sources: DataSourceResource,
                   compute: ComputeResource, store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Image–caption pairs with their own class-free split (train: realignment and the mining pool; val:
    realignment's selection; test: the report's held-out text→image benchmark), and the mining pool.

    The source is a manifest (``path``, ``caption``) or webdataset tar shards (``<key>.jpg`` + ``<key>.txt``,
    :mod:`clipopt_core.data.caption_shards`); either way each pair carries its image's ``sha256``, so the
    data version and every downstream identity follow the images' content."""
    artifacts = store.store()
    _, captions = sources.resolve(compute.cache, context.log.info)
    splits = artifacts.read_parquet(Keys.splits)
    pairs = pl.DataFrame(schema=PAIR_SCHEMA)
    rejected = pl.DataFrame(schema={"reason": pl.String})
    if captions and is_shard_source(captions):
        pairs, rejected = read_caption_shards(captions, progress=lambda n: context.log.info(f"read {n} caption samples"))
    elif captions:
        result = mf.ingest(mf.source_root(captions), mf.scan_source(captions, "manifest", captions_only=True),
                           captions_only=True)
        pairs, rejected = result.accepted.select(*PAIR_SCHEMA), result.rejected
    pairs = split_caption_pairs(pairs, val_fraction=config.caption_val_fraction,
                                test_fraction=config.caption_test_fraction, seed=config.seed)
    pool = caption_pool(pairs, splits)
    artifacts.write_parquet(Keys.caption_pairs, pairs)
    artifacts.write_parquet(Keys.caption_pool, pl.DataFrame({"text": pool}))
    counts = pairs.group_by("split").agg(pl.len().alias("pairs"), pl.col("uri").n_unique().alias("images"),
                                         pl.col("caption").n_unique().alias("captions")).sort("split")
    return dg.MaterializeResult(metadata={
        "caption_pairs": pairs.height, "pool_texts": len(pool), "splits": md_table(counts),
        "test_pairs": pairs.filter(pl.col("split") == "test").height, "rejected_pairs": rejected.height,
        "rejected_by_reason": md_table(rejected.group_by("reason").len().sort("len", descending=True)),
        "source": captions or "none"},
        data_version=dg.DataVersion(frame_digest(pairs)))


@dg.asset(group_name="models", code_version="1", kinds={"pytorch"})
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, compute: ComputeResource,
               store: ArtifactStoreResource) -> dg.MaterializeResult:
    """The pretrained model every variant starts from (checked loadable here, offline)."""
    bundle = load_model(config.spec(), cache_dir=compute.cache)
    parameters = sum(p.numel() for p in bundle.model.parameters())
    weights = weights_digest(bundle.model)  # the stages' identities start from the weights' content
    store.store().write_json(Keys.base_model, {"spec": asdict(config.spec()), "open_clip_name": bundle.open_clip_name,
                                               "weights_sha256": weights})
    return dg.MaterializeResult(metadata={"name": config.name, "pretrained": str(config.pretrained),
                                          "image_size": bundle.image_size, "embed_dim": bundle.embed_dim,
                                          "parameters_millions": round(parameters / 1e6, 2), "weights_sha256": weights},
                                data_version=dg.DataVersion(f"{weights[:24]}:{config.image_size}"))


@dg.asset(group_name=GROUP, deps=[base_model, image_splits, caption_corpus], code_version="1", pool=GPU_POOL,
          kinds={"pytorch"})
def pseudo_captions(context: dg.AssetExecutionContext, config: MiningSettings, compute: ComputeResource,
                    store: ArtifactStoreResource) -> dg.MaterializeResult:
    """MCIP step 1: top-k pool captions per training image above a threshold, retrieved by the unmodified
    mining model (the base model unless ``model_name`` names another; the authors mined once with a ViT-L/14)."""
    compute.setup_torch()
    artifacts = store.store()
    train = artifacts.read_parquet(Keys.splits).filter(pl.col("split") == "train")
    spec = mining_spec(config.core(), base_spec(artifacts))
    bundle = load_model(spec, cache_dir=compute.cache, device=compute.device)
    # the stored pool is caption_pool's deduplicated output, read in chunks (never whole; an S3 copy is local)
    with open_stored_pool(artifacts, Keys.caption_pool, "text", workdir=compute.cache) as pool:
        table, stats = mine_captions(bundle, train, pool, config.core(), device=compute.device)
    artifacts.write_parquet(Keys.pseudo_captions, table)
    examples = table.filter(pl.col("rank") == 0).join(train.select("image_id", "label"), on="image_id").head(8)
    return dg.MaterializeResult(metadata={
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
        "similarity_histogram": md_table([{"from": a, "count": c} for a, c in similarity_histogram(table)]),
        "examples": md_table(examples.select("label", "caption", "similarity")),
        "uri": artifacts.url(Keys.pseudo_captions), "mining_model": f"{spec.name}:{spec.pretrained}",
    })
