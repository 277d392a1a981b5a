"""Paired-bootstrap confidence intervals for every metric and every delta to the baseline.

docs/method.md ("Evaluation"): effects of 1-2 points need intervals. Each metric is the mean
of a per-query score (:mod:`clipopt_core.evaluate.metrics`). One resample draws the queries of
a *query set* with replacement (``[Q]`` indices); the metrics of that set (I2I mAP, R@1, kNN
and zero-shot share the test images; T2I shares the caption queries) are recomputed on it for
*every* variant with the *same* indices, so a delta's interval reflects only how the variants
differ on the same queries (a paired test). Query sets are resampled independently of each
other, each from its own seeded stream, so adding a metric never changes another set's draws.

Group means and ``avg`` are recomputed per resample from the resampled columns, exactly as
:func:`clipopt_core.evaluate.aggregate.group_means` does from the point values. Intervals are
percentile intervals (the ``(1-c)/2`` and ``(1+c)/2`` quantiles of the resampled values),
default ``B = 1000`` resamples at ``c = 0.95``, seeded.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from clipopt_core.evaluate.aggregate import DEFAULT_GROUPS

Interval = tuple[float, float]
_CHUNK = 100  # resamples drawn at once: the largest temporary is [_CHUNK, Q] float64


@dataclass(frozen=True)
class BootstrapConfig:
    """``resamples`` (B), two-sided ``confidence`` level and the ``seed`` of the resample streams."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"bootstrap resamples must be >= 1, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"bootstrap confidence must be in (0, 1), got {self.confidence}")


def paired_bootstrap(scores: Mapping[str, Mapping[str, np.ndarray]], query_sets: Mapping[str, str], *,
                     baseline: str = "baseline", groups: Mapping[str, Sequence[str]] = DEFAULT_GROUPS,
                     config: BootstrapConfig = BootstrapConfig()) -> dict[str, dict[str, Interval]]:
    """Percentile intervals per variant: ``{variant: {column: (lo, hi), "delta_<column>": (lo, hi)}}``.

    Args:
        scores: variant → metric → per-query scores ``[Q]`` (``nan`` = query skipped by the metric).
        query_sets: metric → name of the query set it is computed over; metrics of one set must have
            the same ``Q`` and are resampled with the same indices. A metric not listed is its own set.
        baseline: the variant the deltas refer to (no deltas when it is absent).
        groups: group → columns, as for ``group_means``; adds ``<group>_mean`` and ``avg`` intervals.

    Columns are the metrics every variant shares. A column whose resamples are all ``nan`` gets ``(nan, nan)``.
    """
    variants = list(scores)
    if not variants:
        return {}
    columns = sorted(set.intersection(*(set(scores[v]) for v in variants)))
    resampled = {v: {} for v in variants}  # variant -> column -> [B]
    for set_name, members in _by_query_set(columns, query_sets).items():
        draws = _resample_means(scores, variants, members, _stream(config.seed, set_name), config.resamples)
        for v in variants:
            resampled[v].update(draws[v])
    for v in variants:
        resampled[v].update(_group_resamples(resampled[v], groups))
    intervals = {v: {c: _percentile(values, config.confidence) for c, values in resampled[v].items()} for v in variants}
    if baseline in resampled:
        for v in variants:
            intervals[v].update({f"delta_{c}": _percentile(values - resampled[baseline][c], config.confidence)
                                 for c, values in resampled[v].items()})
    return intervals


def _by_query_set(columns: Sequence[str], query_sets: Mapping[str, str]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    for column in columns:
        sets.setdefault(query_sets.get(column, column), []).append(column)
    return sets


def _stream(seed: int, set_name: str) -> np.random.Generator:
    """The seeded resample stream of one query set (independent of the other sets)."""
    return np.random.default_rng([seed, zlib.crc32(set_name.encode())])


def _resample_means(scores: Mapping[str, Mapping[str, np.ndarray]], variants: Sequence[str], members: Sequence[str],
                    rng: np.random.Generator, resamples: int) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap means ``[B]`` of every (variant, member metric), all drawn with the same indices."""
    arrays = {(v, m): np.asarray(scores[v][m], dtype=np.float64).reshape(-1) for v in variants for m in members}
    sizes = {a.shape[0] for a in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"metrics {list(members)} share a query set but have different query counts "
                         f"{sorted(sizes)}; give each its own query set")
    n = sizes.pop()
    out = {v: {m: np.full(resamples, np.nan) for m in members} for v in variants}
    if n == 0:
        return out
    filled = {key: (np.nan_to_num(a, nan=0.0), (~np.isnan(a)).astype(np.float64)) for key, a in arrays.items()}
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        for (v, m), (values, counted) in filled.items():
            total, count = values[index].sum(axis=1), counted[index].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[v][m][start:stop] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def _group_resamples(columns: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """``<group>_mean`` and ``avg`` per resample (groups with no column are left out; so are columns
    that are ``nan`` in a resample)."""
    out: dict[str, np.ndarray] = {}
    listed: dict[str, np.ndarray] = {}
    for group, names in groups.items():
        present = {n: columns[n] for n in names if n in columns}
        if present:
            listed.update(present)
            out[f"{group}_mean"] = _nanmean_rows(list(present.values()))
    if listed:
        out["avg"] = _nanmean_rows(list(listed.values()))
    return out


def _nanmean_rows(arrays: list[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan resample -> nan, on purpose
        return np.nanmean(np.stack(arrays), axis=0)


def _percentile(values: np.ndarray, confidence: float) -> Interval:
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(kept, [tail, 100 - tail])
    return float(lo), float(hi)


def per_query_frame(scores: Mapping[str, Mapping[str, np.ndarray]]) -> pl.DataFrame:
    """Long table of per-query scores (``variant, metric, query, score``) for the report's store copy."""
    parts = [pl.DataFrame({"variant": variant, "metric": metric, "query": np.arange(len(values), dtype=np.int64),
                           "score": np.asarray(values, dtype=np.float64)})
             for variant, metrics in scores.items() for metric, values in metrics.items()]
    schema = {"variant": pl.String, "metric": pl.String, "query": pl.Int64, "score": pl.Float64}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def variant_scores(frame: pl.DataFrame, variant: str) -> dict[str, np.ndarray]:
    """``metric → [Q]`` per-query scores of ``variant`` from a :func:`per_query_frame` table (query order kept)."""
    rows = frame.filter(pl.col("variant") == variant).sort("metric", "query")
    if rows.height == 0:
        raise KeyError(f"no per-query scores of variant {variant!r} in the report; re-materialise evaluation_report")
    return {metric: group["score"].to_numpy() for (metric,), group in rows.group_by("metric", maintain_order=True)}
