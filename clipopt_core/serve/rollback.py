"""Roll the served model back to an earlier champion: ``clipopt rollback [--to MODEL_KEY]``.

The catalogue's ``served_models`` table (:mod:`clipopt_core.runtime.catalog`) holds every decision
of ``served_model``; its ``promote`` rows are the champions in the order they were crowned. A rollback
re-embeds the gallery with the earlier champion's archived weights, builds the index into staging
and promotes it at its recall target (:mod:`clipopt_core.serve.promotion`); only then is
``releases/champion.json`` switched and a ``rollback`` row appended. A rollback whose index misses its
target changes nothing that is served.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from clipopt_core.layout import Keys
from clipopt_core.runtime.catalog import SERVED_HISTORY, Catalog
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve import shards as sharding
from clipopt_core.serve.champion import ServedModel, champion_spec, current, history_row, reinstate
from clipopt_core.serve.index import IndexSpec
from clipopt_core.serve.promotion import build_and_promote
from clipopt_core.serve.search import lazy_image_embedder

CHAMPION_FIELDS = tuple(ServedModel.__dataclass_fields__)


def crowned(history: pl.DataFrame) -> list[ServedModel]:
    """The champions of ``history`` (``served_models`` rows) in the order they were promoted."""
    if history.is_empty():
        return []
    rows = history.filter(pl.col("action") == "promote").sort("decided_at")
    return [ServedModel(**{f: row[f"champion_{f}"] for f in CHAMPION_FIELDS}) for row in rows.iter_rows(named=True)]


def rollback_target(history: pl.DataFrame, serving: ServedModel | None, to: str | None = None) -> ServedModel:
    """The champion to restore: the one named ``to`` (a model key), else the one promoted before ``serving``."""
    champions = crowned(history)
    if to is not None:
        named = [c for c in champions if c.model_key == to]
        if not named:
            known = ", ".join(dict.fromkeys(c.model_key for c in champions)) or "none"
            raise ValueError(f"no champion {to!r} in the served-model history (known: {known})")
        return named[-1]
    if serving is None:
        raise ValueError("nothing is served yet, so there is nothing to roll back from")
    keys = [c.model_key for c in champions]
    if serving.model_key not in keys:
        raise ValueError(f"the champion {serving.model_key} is not in the served-model history; pass --to MODEL_KEY")
    first = keys.index(serving.model_key)
    earlier = [c for c in champions[:first] if c.model_key != serving.model_key]
    if not earlier:
        raise ValueError(f"{serving.model_key} is the first champion in the history: there is no earlier one")
    return earlier[-1]


def rollback(store: ArtifactStore, catalog: Catalog, *, cache: Path, num_shards: int, to: str | None = None,
             index_spec: IndexSpec = IndexSpec(), device: str = "cpu", prefix: str = Keys.serving) -> dict[str, Any]:
    """Serve an earlier champion again (module docstring); returns a summary of what was done."""
    serving = current(store)
    target = rollback_target(catalog.read(SERVED_HISTORY, "decided_at"), serving, to)
    manifest = store.read_parquet(Keys.manifest)
    embed = lazy_image_embedder(lambda: champion_spec(store, target, cache), cache, device=device)
    embedded = [sharding.embed_shard(manifest, shard, num_shards, store, embed, model_key=target.model_key,
                                     prefix=prefix) for shard in range(num_shards)]
    _, outcome = build_and_promote(store, num_shards, index_spec, prefix)
    if not outcome.promoted:
        raise RuntimeError(f"rollback to {target.model_key} not done: its index {outcome.reason}")
    reinstate(store, target)
    source = serving.model_key if serving else None
    catalog.append(SERVED_HISTORY, history_row("rollback", "clipopt rollback", source,
                                               f"rolled back from {source} to {target.model_key}", target))
    return {"from": serving.model_key if serving else None, "to": target.model_key, "variant": target.variant,
            "report_id": target.report_id, "embedded_shards": sum(not r["skipped"] for r in embedded),
            "recall_at_10": round(outcome.recall, 4)}
