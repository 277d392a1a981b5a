"""Serve only what passed: a built index is staged, and promoted to the served keys only when it meets its target.

``faiss_index`` builds into ``<prefix>/index-staging/`` (:data:`~clipopt_core.serve.shards.STAGING_FOLDER`);
:func:`promote_if_passed` copies it onto ``<prefix>/index/`` only when recall@10 vs exact search
(``info.json``: ``recall_at_10``, measured on held-out vectors, see ``docs/method.md``) is at least
``target_recall``. Otherwise the served index stays exactly as it was. ``info.json`` is copied last: it
is the commit marker readers check against the index (:class:`clipopt_core.serve.search.SearchService`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipopt_core.runtime.storage import ArtifactStore, StorageError
from clipopt_core.serve.index import IndexSpec
from clipopt_core.serve.shards import (DEFAULT_PREFIX, SERVED_FOLDER, STAGING_FOLDER, build_sharded_index,
                                       index_key)

INFO = "info.json"


@dataclass(frozen=True)
class Promotion:
    """Outcome of a gate: ``promoted``, the candidate's ``recall`` and ``target``, and ``reason`` in words."""

    promoted: bool
    recall: float
    target: float
    reason: str

    def metadata(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "candidate_recall_at_10": round(self.recall, 4),
                "target_recall": self.target, "promotion": self.reason}


def build_and_promote(store: ArtifactStore, num_shards: int, spec: IndexSpec = IndexSpec(),
                      prefix: str = DEFAULT_PREFIX) -> tuple[dict[str, Any], Promotion]:
    """Build the index of ``prefix``'s gallery shards into staging and promote it when it meets its target;
    returns the staged index's info and the :class:`Promotion`."""
    _, info = build_sharded_index(store, num_shards, spec, prefix=prefix, folder=STAGING_FOLDER)
    return info, promote_if_passed(store, prefix)


def promote_if_passed(store: ArtifactStore, prefix: str = DEFAULT_PREFIX) -> Promotion:
    """Promote the staged index of ``prefix`` when its recall@10 ≥ its target; else leave the served one alone."""
    info = store.read_json(index_key(prefix, INFO, STAGING_FOLDER))
    recall, target = float(info["recall_at_10"]), float(info["target_recall"])
    if recall < target:
        return Promotion(False, recall, target, f"refused: recall@10 {recall:.4f} < target {target}; "
                                                f"{store.url(index_key(prefix, INFO))} still serves the earlier index")
    promote(store, prefix)
    return Promotion(True, recall, target, f"promoted: recall@10 {recall:.4f} >= target {target}")


def promote(store: ArtifactStore, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Copy every staged file onto the served keys, ``info.json`` last; returns the served keys written."""
    staged = store.list_keys(f"{prefix}/{STAGING_FOLDER}")
    names = [key.rsplit("/", 1)[-1] for key in staged if ".tmp-" not in key]
    if INFO not in names:
        raise StorageError(f"{store.url(index_key(prefix, INFO, STAGING_FOLDER))} is missing: nothing staged")
    ordered = [name for name in names if name != INFO] + [INFO]
    for name in ordered:
        store.copy(index_key(prefix, name, STAGING_FOLDER), index_key(prefix, name))
    return [index_key(prefix, name, SERVED_FOLDER) for name in ordered]


def served_info(store: ArtifactStore, prefix: str = DEFAULT_PREFIX) -> dict[str, Any] | None:
    """``info.json`` of the index being served, or ``None`` when none was ever promoted."""
    key = index_key(prefix, INFO)
    return store.read_json(key) if store.exists(key) else None
