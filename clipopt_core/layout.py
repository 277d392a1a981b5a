"""Where each artifact lives in the artifact store (shared by the CLI and the Dagster assets)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from clipopt_core.models.loading import ModelSpec, checkpoint_spec
from clipopt_core.registry import BASELINE, get_stage
from clipopt_core.serve.shards import index_key
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore

MODEL_ROOT = "models"


def default_cache_dir() -> str:
    """``$CLIPOPT_CACHE``, else ``~/.cache/clipopt``: models, demo data, work folders, the catalogue."""
    return os.environ.get("CLIPOPT_CACHE", str(Path.home() / ".cache" / "clipopt"))


def default_store_url() -> str:
    """``$CLIPOPT_ARTIFACTS``, else the ``artifacts`` folder of the cache."""
    return os.environ.get("CLIPOPT_ARTIFACTS", f"file://{default_cache_dir()}/artifacts")


class Keys:
    """Store keys of every artifact."""

    listing = "data/raw_images.parquet"
    manifest = "data/manifest.parquet"
    rejected = "data/rejected.parquet"
    splits = "data/splits.parquet"
    caption_pairs = "data/caption_pairs.parquet"
    caption_pool = "data/caption_pool.parquet"
    base_model = "models/base/spec.json"
    pseudo_captions = "captions/pseudo_captions.parquet"
    report = "reports/evaluation.parquet"
    report_json = "reports/evaluation.json"
    report_md = "reports/evaluation.md"
    per_query = "reports/per_query.parquet"  # every variant's per-query scores (champion/challenger compares them)
    teaser = "reports/teaser.png"
    gallery = "reports/gallery.png"
    seed_report = "reports/seeds.parquet"
    seed_report_md = "reports/seeds.md"
    gallery_t2i = "reports/gallery_t2i.png"
    serving = "serving"  # prefix of the gallery embedding shards and the served index (clipopt_core.serve.shards)
    index = index_key(serving, "merged.faiss")
    index_ids = index_key(serving, "ids.parquet")
    index_info = index_key(serving, "info.json")

    @staticmethod
    def model(name: str, root: str = MODEL_ROOT) -> str:
        """A stage's checkpoint folder: ``models/<asset>``, or under another ``root`` (e.g. a seed sweep's)."""
        return f"{root}/{name}"


def base_spec(store: ArtifactStore) -> ModelSpec:
    """The base model recorded by the ``base_model`` step."""
    return ModelSpec(**store.read_json(Keys.base_model)["spec"])


def stage_spec(store: ArtifactStore, name: str, cache: Path, image_size: int | None,
               root: str = MODEL_ROOT) -> ModelSpec:
    """Download the checkpoint folder of stage ``name`` (skipped when cached, same hashes) and return its spec."""
    local = cache / "checkpoints" / root.replace("/", "-") / name
    return checkpoint_spec(store.get_dir(Keys.model(name, root), local), image_size)


def variant_spec(store: ArtifactStore, variant: str, cache: Path, root: str = MODEL_ROOT) -> ModelSpec:
    """Spec of a report variant: ``baseline`` or a registered stage's variant (or asset) name."""
    base = base_spec(store)
    if variant == BASELINE:
        return base
    return stage_spec(store, get_stage(variant).asset, cache, base.image_size, root)


def served_model_key(store: ArtifactStore, variant: str) -> str:
    """``<variant>:<16 hex>``: names the exact weights of ``variant`` (hash of its published checkpoint
    manifest, or of the base model record), so embeddings of other weights are never reused."""
    source = Keys.base_model if variant == BASELINE else f"{Keys.model(get_stage(variant).asset)}/{COMPLETE_MARKER}"
    digest = hashlib.sha256(json.dumps(store.read_json(source), sort_keys=True).encode()).hexdigest()
    return f"{variant}:{digest[:16]}"
