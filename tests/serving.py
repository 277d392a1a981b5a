"""Publish small search indexes into a store with the core functions (what faiss_index and
baseline_index leave behind), for the search-service tests and ``benchmarks/serve_load.py``.

Images are the test suite's drawn shapes; models are ``clipopt-tiny`` (or any :class:`ModelSpec`)
and, for a trained variant, a checkpoint whose weights are the base's plus seeded noise, so two
publications differ in model *and* index.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import torch

from clipopt_core.layout import Keys
from clipopt_core.serve.champion import resolve_served
from clipopt_core.registry import get_stage
from clipopt_core.models.loading import ModelSpec, export_checkpoint, load_model
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.search import BASELINE_PREFIX, lazy_image_embedder
from clipopt_core.serve.shards import build_sharded_index, embed_shard

TINY = ModelSpec("clipopt-tiny")


def shapes_manifest(root: Path) -> pl.DataFrame:
    """The manifest of a shapes source folder (``tests.conftest.write_shapes_source``): image_id, uri, label, …"""
    rows = pl.read_csv(root / "manifest.csv")
    return rows.with_columns(
        pl.col("path").map_elements(lambda p: hashlib.sha256(p.encode()).hexdigest()[:20], return_dtype=pl.Utf8)
        .alias("image_id"),
        pl.col("path").map_elements(lambda p: str((root / p).resolve()), return_dtype=pl.Utf8).alias("uri"))


def publish_base(store: ArtifactStore, manifest: pl.DataFrame, spec: ModelSpec = TINY) -> None:
    store.write_json(Keys.base_model, {"spec": {"name": spec.name, "pretrained": spec.pretrained,
                                                "image_size": spec.image_size}})
    store.write_parquet(Keys.manifest, manifest)


def publish_checkpoint(store: ArtifactStore, variant: str, noise_seed: int, work: Path, spec: ModelSpec = TINY) -> None:
    """A checkpoint of ``variant``: the base model's weights plus N(0, 0.05²) noise drawn with ``noise_seed``."""
    bundle = load_model(spec, cache_dir=work / "cache")
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    folder = export_checkpoint(bundle, work / f"ckpt-{variant}-{noise_seed}", {"stage": variant, "seed": noise_seed})
    store.put_dir(folder, Keys.model(get_stage(variant).asset))


def publish_index(store: ArtifactStore, variant: str, cache: Path, *, prefix: str = Keys.serving,
                  num_shards: int = 2) -> dict:
    """Embed the store's manifest with ``variant``'s weights into ``num_shards`` shards under ``prefix``
    and build the index there; returns the index info. For the served prefix the report names ``variant``."""
    if prefix == Keys.serving:
        store.write_json(Keys.report_json, {"serve_variant": variant})
    manifest = store.read_parquet(Keys.manifest)
    _, key, spec = resolve_served(store, cache, variant)
    embed = lazy_image_embedder(spec, cache, batch_size=64)
    for shard in range(num_shards):
        embed_shard(manifest, shard, num_shards, store, embed, model_key=key, prefix=prefix)
    return build_sharded_index(store, num_shards, prefix=prefix)[1]


def publish_all(store: ArtifactStore, images: Path, work: Path, *, served: str = "stage1", noise_seed: int = 1,
                baseline: bool = True, spec: ModelSpec = TINY) -> None:
    """Base model, manifest, a ``served`` checkpoint (unless it is the baseline), its index and the baseline index."""
    publish_base(store, shapes_manifest(images), spec)
    if served != "baseline":
        publish_checkpoint(store, served, noise_seed, work, spec)
    publish_index(store, served, work / "cache")
    if baseline:
        publish_index(store, "baseline", work / "cache", prefix=BASELINE_PREFIX)
