"""Champion and challenger: which model serves, why, and how to go back (``docs/method.md#champion-and-challenger``).

The *champion* is the model the gallery index and the search service use. Its checkpoint folder is
archived under ``releases/models/<variant>-<16 hex>/`` when it is crowned, so retraining (which
republishes ``models/<stage>/``) never touches the weights being served, and a rollback can restore
any earlier champion. ``releases/champion.json`` names the current one and is written last.

A retrained *challenger* (the report's ``serve_variant``) replaces the champion only when, on the
current test split, it is not significantly worse on any gate metric: the champion is evaluated
again on that split (:func:`champion_scores`) and :func:`judge` compares the two with the paired bootstrap of the report
(challenger − champion per query). Significantly worse = the upper bound of the delta's interval
is below zero and the point drop exceeds ``tolerance``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import polars as pl

from clipopt_core.evaluate.bootstrap import BootstrapConfig, paired_bootstrap, variant_scores
from clipopt_core.evaluate.protocol import QUERY_SETS
from clipopt_core.layout import Keys, base_spec, served_model_key, variant_spec
from clipopt_core.models.loading import WEIGHTS_FILE, ModelSpec, checkpoint_spec
from clipopt_core.registry import BASELINE, get_stage
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore, StorageError

CHAMPION_KEY = "releases/champion.json"
ARCHIVE_ROOT = "releases/models"
# metric -> fallback when it was not measured (T2I on class captions when no held-out pairs exist)
GATE_METRICS = {"i2i_map": None, "t2i_r5": "t2i_cls_r5", "zs_top1": None}


@dataclass(frozen=True)
class ServedModel:
    """A crowned model: ``model_key`` (``<variant>:<16 hex>``, :func:`clipopt_core.layout.served_model_key`),
    ``weights_sha256`` (of its safetensors file; for the baseline the base model's weights digest),
    ``checkpoint`` (store key of its archived folder; ``None`` for the baseline, which is the base model
    record), the sha256 of the test split it was judged on, the id of that report's run, and when."""

    variant: str
    model_key: str
    weights_sha256: str
    checkpoint: str | None
    data_fingerprint: str
    report_id: str
    crowned_at: float

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """``promote`` or not, ``reason`` in words, and per gate metric ``(delta, lo, hi)`` of challenger − champion."""

    promote: bool
    reason: str
    deltas: dict[str, tuple[float, float, float]]


def history_row(action: str, run_id: str, challenger: str | None, reason: str, champion: ServedModel) -> pl.DataFrame:
    """One ``served_models`` row: when (``decided_at``, epoch s), which run, ``action`` (promote, refused,
    kept, rollback), the challenger's model key, the reason in words, and the champion after the decision
    (``champion_*``)."""
    return pl.DataFrame([{"decided_at": time.time(), "run_id": run_id, "action": action, "challenger": challenger,
                          "reason": reason, **{f"champion_{k}": v for k, v in champion.as_row().items()}}])


def current(store: ArtifactStore) -> ServedModel | None:
    """The champion named by ``releases/champion.json``, or ``None`` before the first one is crowned."""
    return ServedModel(**store.read_json(CHAMPION_KEY)) if store.exists(CHAMPION_KEY) else None


def archive_key(model_key: str) -> str:
    return f"{ARCHIVE_ROOT}/{model_key.replace(':', '-')}"


def crown(store: ArtifactStore, variant: str, *, data_fingerprint: str, report_id: str) -> ServedModel:
    """Archive ``variant``'s published checkpoint (once per weights) and make it the champion."""
    model_key = served_model_key(store, variant)
    checkpoint = None if variant == BASELINE else archive_key(model_key)
    if checkpoint is not None and not store.exists(f"{checkpoint}/{COMPLETE_MARKER}"):
        source = Keys.model(get_stage(variant).asset)
        names = [key.rsplit("/", 1)[-1] for key in store.list_keys(source) if ".tmp-" not in key]
        if COMPLETE_MARKER not in names:
            raise StorageError(f"{store.url(source)} is not a sealed checkpoint folder; re-materialise its stage")
        for name in [n for n in names if n != COMPLETE_MARKER] + [COMPLETE_MARKER]:  # the seal last
            store.copy(f"{source}/{name}", f"{checkpoint}/{name}")
    served = ServedModel(variant, model_key, weights_sha256(store, variant), checkpoint, data_fingerprint, report_id,
                         time.time())
    return reinstate(store, served)


def weights_sha256(store: ArtifactStore, variant: str) -> str:
    """sha256 of ``variant``'s published weights (from its folder's seal; the base model's recorded digest)."""
    if variant == BASELINE:
        return str(store.read_json(Keys.base_model).get("weights_sha256", ""))
    return store.read_json(f"{Keys.model(get_stage(variant).asset)}/{COMPLETE_MARKER}")["files"][WEIGHTS_FILE]


def reinstate(store: ArtifactStore, served: ServedModel) -> ServedModel:
    """Make ``served`` (an archived champion) the champion again; its archive must be intact."""
    if served.checkpoint is not None and not store.exists(f"{served.checkpoint}/{COMPLETE_MARKER}"):
        raise StorageError(f"{store.url(served.checkpoint)} holds no sealed checkpoint of {served.model_key}: "
                           "it cannot serve (was the archive deleted?)")
    store.write_json(CHAMPION_KEY, served.as_row())
    return served


def champion_spec(store: ArtifactStore, served: ServedModel, cache: Path) -> ModelSpec:
    """The spec that loads ``served``: the base model for the baseline, else its archived checkpoint."""
    base = base_spec(store)
    if served.checkpoint is None:
        return base
    local = cache / "checkpoints" / "served" / served.model_key.replace(":", "-")
    return checkpoint_spec(store.get_dir(served.checkpoint, local), base.image_size)


def champion_scores(store: ArtifactStore, served: ServedModel, report_scores: pl.DataFrame,
                    evaluate: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """Per-query scores (metric → ``[Q]``) of the champion on the report's test split, and whether they
    were measured afresh.

    While the champion's weights are still its variant's published ones, the report has just measured
    exactly them (:func:`clipopt_core.evaluate.bootstrap.per_query_frame` table ``report_scores``), so
    they are reused; otherwise (its stage was retrained since) ``evaluate()`` measures the archived weights.
    """
    if served_model_key(store, served.variant) == served.model_key:
        return variant_scores(report_scores, served.variant), False
    return evaluate(), True


def judge(challenger: Mapping[str, np.ndarray], champion: Mapping[str, np.ndarray], *,
          config: BootstrapConfig = BootstrapConfig(), tolerance: float = 0.0) -> Verdict:
    """Compare per-query scores (metric → ``[Q]``, same queries in the same order) of two models.

    Refuses when some gate metric is significantly worse for the challenger (upper bound of the paired
    95% interval of challenger − champion below zero) by more than ``tolerance``; promotes otherwise.
    """
    intervals = paired_bootstrap({"champion": champion, "challenger": challenger}, QUERY_SETS,
                                 baseline="champion", config=config)["challenger"]
    deltas, worse = {}, []
    for metric, fallback in GATE_METRICS.items():
        if not _measured(challenger, champion, metric) and fallback:
            metric = fallback
        if not _measured(challenger, champion, metric):
            continue
        delta = float(np.nanmean(challenger[metric]) - np.nanmean(champion[metric]))
        lo, hi = intervals[f"delta_{metric}"]
        deltas[metric] = (delta, lo, hi)
        if hi < 0 and delta < -tolerance:
            worse.append(f"{metric} {delta:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    if worse:
        return Verdict(False, "refused: significantly worse than the champion on " + ", ".join(worse), deltas)
    shown = ", ".join(f"{m} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, (d, lo, hi) in deltas.items())
    return Verdict(True, f"promoted: not significantly worse than the champion ({shown})", deltas)


def _measured(challenger: Mapping[str, np.ndarray], champion: Mapping[str, np.ndarray], metric: str) -> bool:
    """Both models have at least one finite per-query score of ``metric``."""
    return all(metric in scores and bool(np.isfinite(scores[metric]).any()) for scores in (challenger, champion))


def resolve_served(store: ArtifactStore, cache: Path,
                   variant: str | None = None) -> tuple[str, str, Callable[[], ModelSpec]]:
    """``(variant, model_key, spec loader)`` of the weights to embed or search with.

    ``variant`` given: that variant's currently published weights. Otherwise the champion; before any
    champion was crowned (a store from before champion/challenger), the report's ``serve_variant``.
    """
    if variant is None:
        served = current(store)
        if served is not None:
            return served.variant, served.model_key, lambda: champion_spec(store, served, cache)
        if not store.exists(Keys.report_json):
            raise FileNotFoundError(f"{store.url(CHAMPION_KEY)} is missing; materialise served_model first")
        variant = store.read_json(Keys.report_json)["serve_variant"]
    chosen = variant
    return chosen, served_model_key(store, chosen), lambda: variant_spec(store, chosen, cache)
