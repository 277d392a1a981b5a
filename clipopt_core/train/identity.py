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

from clipopt_core.runtime.digest import frame_digest
from clipopt_core.train.config import NOT_IN_IDENTITY

IDENTITY_VERSION = 2  # bump when training semantics change: v2 = the authors' MC loss, fp32 margins, square eval crop


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
