"""Input-addressed work: a stage's identity is the hash of the *content* of everything it reads.

Two runs with the same identity would train the same weights, so a finished run is reused; any
change in an input (an image's bytes, a label, the split seed, a pseudo-caption, a caption pair,
the base or encoder weights, any setting) gives a new identity, hence a fresh work folder and a
fresh training run. Paths and URIs are left out: moving the same data elsewhere keeps the identity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import polars as pl
import torch

from clipopt_core.train.config import NOT_IN_IDENTITY

IDENTITY_VERSION = 2  # bump when training semantics change: v2 = the authors' MC loss, fp32 margins, square eval crop
LOCATION_COLUMNS = frozenset({"uri", "path", "root"})


def frame_digest(frame: pl.DataFrame | pl.LazyFrame | None) -> str:
    """sha256 of a frame's content (row order kept, location columns left out); ``"none"`` for ``None``.

    Rows are serialised as CSV with sorted column names, so the digest is stable across
    processes and polars versions (unlike ``hash_rows``). A lazy frame (e.g. a parquet scan) is read
    100,000 rows at a time and gives the same digest as the collected frame, so memory stays bounded.
    """
    if frame is None:
        return "none"
    lazy = frame.lazy()
    columns = sorted(c for c in lazy.collect_schema().names() if c not in LOCATION_COLUMNS)
    digest = hashlib.sha256(",".join(columns).encode())
    for start in range(0, frame_rows(frame), 100_000):
        digest.update(lazy.slice(start, 100_000).select(columns).collect().write_csv(include_header=False).encode())
    return digest.hexdigest()


def frame_rows(frame: pl.DataFrame | pl.LazyFrame) -> int:
    """Row count of a frame; for a lazy parquet scan, from the files' metadata (nothing is read whole)."""
    return frame.height if isinstance(frame, pl.DataFrame) else int(frame.select(pl.len()).collect().item())


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def stage_identity(kind: str, config: Any, *, start_weights: str,
                   inputs: Mapping[str, pl.DataFrame | pl.LazyFrame | None]) -> str:
    """The identity (64 hex) of a stage run.

    Args:
        kind: the stage kind (``retrieval``, ``mcip``, ``realign``).
        config: the stage's frozen config dataclass (every field counts, seeds included, except the
            execution-only top-level fields of :data:`~clipopt_core.train.config.NOT_IN_IDENTITY`).
        start_weights: sha256 of the weights training starts from (base model or encoder).
        inputs: named data frames the stage reads (splits, pseudo-captions, caption pairs, …).
    """
    record = {
        "version": IDENTITY_VERSION, "kind": kind, "start_weights": start_weights,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_IDENTITY},
        "inputs": {name: frame_digest(frame) for name, frame in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
