"""Aggregates of metric columns: the paper's group means and AVG, and per-query scores averaged by group.

Pure arithmetic over values that :mod:`clipopt_core.evaluate.metrics` computed (docs/method.md,
"Evaluation"); :mod:`clipopt_core.evaluate.bootstrap` resamples the same aggregates for intervals.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

# The paper's columns (docs/method.md, "Evaluation"): one headline column per benchmark kind; T2I is
# R@5 on held-out image-caption pairs. ``avg`` is the plain mean of these five columns.
DEFAULT_GROUPS: dict[str, list[str]] = {
    "i2i": ["i2i_map", "i2i_r1"],
    "knn": ["knn_top1"],
    "zs": ["zs_top1"],
    "t2i": ["t2i_r5"],
}


def _present(metrics: Mapping[str, float], name: str) -> float | None:
    v = metrics.get(name)
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def group_means(
    metrics: Mapping[str, float], groups: Mapping[str, Sequence[str]] = DEFAULT_GROUPS
) -> dict[str, float]:
    """Per-group means ``{"<group>_mean": ...}`` plus ``avg``.

    ``avg`` is the plain mean of every listed column that is present (each column once), not
    the mean of the group means -- the paper's AVG over its benchmark columns. Missing or NaN
    metrics are ignored; a group with no usable metric gets ``nan``.
    """
    out: dict[str, float] = {}
    seen: dict[str, float] = {}
    for g, names in groups.items():
        vals = []
        for name in names:
            v = _present(metrics, name)
            if v is not None:
                vals.append(v)
                seen[name] = v
        out[f"{g}_mean"] = sum(vals) / len(vals) if vals else float("nan")
    out["avg"] = sum(seen.values()) / len(seen) if seen else float("nan")
    return out


def mean_by_group(scores: Tensor, groups: Sequence[str]) -> dict[str, float]:
    """``{group: mean of its non-nan scores}`` in sorted group order (``nan`` for a group with none);
    ``scores [N]`` per-query scores, ``groups`` length N (e.g. the per-query APs by source)."""
    if len(groups) != scores.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries but there are {scores.shape[0]} scores")
    scores = scores.cpu()
    src_arr = np.asarray(list(groups), dtype=object)
    out: dict[str, float] = {}
    for src in sorted(set(src_arr.tolist())):
        values = scores[torch.from_numpy(src_arr == src)]
        values = values[~values.isnan()]
        out[src] = float(values.mean()) if len(values) else float("nan")
    return out
