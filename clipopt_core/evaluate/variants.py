"""Evaluate report variants (the baseline and registered stages) as they are published in the store.

One function serves the evaluation report and the seed sweep, so both measure with the same
protocol (:func:`clipopt_core.evaluate.protocol.evaluate_model`) and share embeddings between
variants whose towers are identical (e.g. stage 1 and 2SFT have the same image tower).
Memory does not grow with the number of variants: the shared cache is bounded
(``EvalConfig.embedding_cache_bytes``) and each variant's result keeps its scores and the gallery's
top-5 neighbours, not its ``[N, D]`` test embeddings.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from clipopt_core.evaluate.protocol import EmbeddingCache, EvalConfig, EvalResult, evaluate_model
from clipopt_core.layout import MODEL_ROOT, variant_spec
from clipopt_core.models.loading import load_model
from clipopt_core.runtime.storage import ArtifactStore


def evaluate_variants(store: ArtifactStore, variants: Sequence[str], test: pl.DataFrame, caption_pairs: pl.DataFrame,
                      config: EvalConfig, *, cache_dir: Path, device: str = "cpu", root: str = MODEL_ROOT,
                      log: Callable[[str], None] = lambda message: None) -> dict[str, EvalResult]:
    """``{variant: result}`` on the labelled ``test`` split and the held-out ``caption_pairs`` (``uri``, ``caption``).

    ``root``: the store folder of the stages' checkpoints (``models``, or a seed's ``sweeps/seed-<n>/models``).
    Each result's ``image_embeddings`` is ``None`` (released); ``i2i_examples`` holds what the gallery draws.
    """
    cache = EmbeddingCache(config.embedding_cache_bytes)
    results = {}
    for variant in variants:
        started = time.perf_counter()
        bundle = load_model(variant_spec(store, variant, cache_dir, root), cache_dir=cache_dir, device=device)
        result = evaluate_model(bundle, test, config, caption_pairs=caption_pairs, cache=cache, device=device)
        results[variant] = dataclasses.replace(result, image_embeddings=None)
        log(f"{variant}: {result.metrics} ({time.perf_counter() - started:.1f}s)")
    return results
