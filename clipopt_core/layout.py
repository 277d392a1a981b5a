"""Where each artifact lives in the artifact store (shared by the CLI and the Dagster assets)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from clipopt_core.models.loading import ModelSpec, checkpoint_spec
from clipopt_core.serve.shards import index_key
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore

VARIANT_MODELS = {"stage1": "retrieval_encoder", "2sft": "realigned_2sft", "mcip": "mcip_encoder",
                  "mcip_realign": "realigned_mcip"}


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
    teaser = "reports/teaser.png"
    gallery = "reports/gallery.png"
    gallery_t2i = "reports/gallery_t2i.png"
    serving = "serving"  # prefix of the gallery embedding shards and the served index (clipopt_core.serve.shards)
    index = index_key(serving, "merged.faiss")
    index_ids = index_key(serving, "ids.parquet")
    index_info = index_key(serving, "info.json")

    @staticmethod
    def model(name: str) -> str:
        return f"models/{name}"


def base_spec(store: ArtifactStore) -> ModelSpec:
    """The base model recorded by the ``base_model`` step."""
    return ModelSpec(**store.read_json(Keys.base_model)["spec"])


def stage_spec(store: ArtifactStore, name: str, cache: Path, image_size: int | None) -> ModelSpec:
    """Download the checkpoint folder of stage ``name`` (skipped when cached, same hashes) and return its spec."""
    return checkpoint_spec(store.get_dir(Keys.model(name), cache / "checkpoints" / name), image_size)


def variant_spec(store: ArtifactStore, variant: str, cache: Path) -> ModelSpec:
    """Spec of a report variant: ``baseline`` or one of :data:`VARIANT_MODELS`."""
    base = base_spec(store)
    if variant == "baseline":
        return base
    if variant not in VARIANT_MODELS:
        raise ValueError(f"unknown variant {variant!r}; one of baseline, {', '.join(VARIANT_MODELS)}")
    return stage_spec(store, VARIANT_MODELS[variant], cache, base.image_size)


def served_model_key(store: ArtifactStore, variant: str) -> str:
    """``<variant>:<16 hex>``: names the exact weights of ``variant`` (hash of its published checkpoint
    manifest, or of the base model record), so embeddings of other weights are never reused."""
    source = Keys.base_model if variant == "baseline" else f"{Keys.model(VARIANT_MODELS.get(variant, variant))}/{COMPLETE_MARKER}"
    digest = hashlib.sha256(json.dumps(store.read_json(source), sort_keys=True).encode()).hexdigest()
    return f"{variant}:{digest[:16]}"
