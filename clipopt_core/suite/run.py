"""Run Table 1 columns for one or more models: load the benchmark once, evaluate every model on it.

Shared by ``clipopt benchmark-suite`` (one model, many columns) and the ``benchmark_suite`` Dagster asset
(one column per partition, every variant). A column whose roots are not configured is *skipped* with the
reason (:meth:`clipopt_core.suite.columns.Column.missing`); a configured root that does not hold the
official layout fails with the loader's :class:`~clipopt_core.suite.types.BenchmarkLayoutError`.

Every result keeps the per-query scores its values are the means of (:attr:`ColumnResult.per_query`), for the
paired bootstrap of Table 1 (:mod:`clipopt_core.suite.intervals`). They are stored apart from the JSON, as a
parquet table (:func:`scores_frame`), and joined back by :func:`attach_scores`, which checks that they still
average to the stored values.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from clipopt_core.evaluate.bootstrap import per_query_frame, variant_scores
from clipopt_core.suite.columns import Column, SuiteOptions, get_column
from clipopt_core.suite.embedding import SuiteEmbedder
from clipopt_core.suite.protocols import Scores, point_values
from clipopt_core.suite.types import CaptionSet, ImageSet, RevisitedSet

SCORES_SCHEMA = {"column": pl.String, "variant": pl.String, "metric": pl.String, "query": pl.Int64, "score": pl.Float64}


@dataclass(frozen=True)
class ColumnResult:
    """One column's outcome: ``metrics`` ``{variant: {metric: value in [0, 1]}}`` (all the protocol's outputs,
    e.g. easy/medium/hard or R@1/5/10), or ``skipped`` with the reason; ``seconds`` of wall time per variant;
    ``model_keys``: ``{variant: key of the weights evaluated}`` (set by the caller), so a report can tell a
    result of older weights. ``queries``: :func:`query_digest` of the benchmark's queries (columns with the
    same digest were measured on the same queries). ``per_query``: ``{variant: {metric: [Q] float64}}``, the
    scores each value is the mean of (``nan`` = query skipped); not part of the JSON (:func:`scores_frame`)."""

    column: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    model_keys: dict[str, str] = field(default_factory=dict)
    queries: str = ""
    per_query: dict[str, Scores] = field(default_factory=dict, compare=False, repr=False)

    def headline(self, variant: str) -> float:
        """The Table 1 value of ``variant`` (the column's headline metric, in [0, 1])."""
        return self.metrics[variant][get_column(self.column).metric]

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-query scores (:func:`scores_frame` stores those)."""
        return {"column": self.column, "metrics": self.metrics, "skipped": self.skipped, "seconds": self.seconds,
                "model_keys": self.model_keys, "queries": self.queries}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> "ColumnResult":
        """The result of :meth:`to_json`, without per-query scores (:func:`attach_scores` adds them)."""
        get_column(str(payload["column"]))  # an unknown column is an error naming it
        metrics = {v: {k: math.nan if x is None else float(x) for k, x in m.items()}
                   for v, m in payload.get("metrics", {}).items()}
        return cls(str(payload["column"]), metrics, payload.get("skipped"), dict(payload.get("seconds", {})),
                   dict(payload.get("model_keys", {})), str(payload.get("queries", "")))


def evaluate_column(column: Column, roots: Mapping[str, str], embedders: Mapping[str, Callable[[], SuiteEmbedder]],
                    options: SuiteOptions = SuiteOptions(), *,
                    log: Callable[[str], None] = lambda message: None) -> ColumnResult:
    """``column`` for every ``{variant: make_embedder}`` (each called once, when its turn comes)."""
    reason = column.missing(roots)
    if reason:
        log(f"{column.name}: skipped: {reason}")
        return ColumnResult(column.name, skipped=reason)
    started = time.perf_counter()
    benchmark = column.load(roots)
    log(f"{column.name}: benchmark loaded in {time.perf_counter() - started:.1f}s")
    metrics, seconds, per_query = {}, {}, {}
    for variant, make_embedder in embedders.items():
        started = time.perf_counter()
        per_query[variant] = column.evaluate(make_embedder(), benchmark, options)
        metrics[variant] = point_values(per_query[variant])
        seconds[variant] = round(time.perf_counter() - started, 2)
        log(f"{column.name} / {variant}: {metrics[variant]} ({seconds[variant]}s)")
    return ColumnResult(column.name, metrics, seconds=seconds, queries=query_digest(benchmark), per_query=per_query)


def query_digest(benchmark: Any) -> str:
    """sha256 of a loaded benchmark's queries in order: image URIs (the test split for kNN, whose benchmark is
    ``(database, queries)``; the query images of revisited sets), or captions with their image for T2I."""
    if isinstance(benchmark, tuple):
        benchmark = benchmark[1]
    if isinstance(benchmark, ImageSet):
        ids: Sequence[str] = benchmark.uris
    elif isinstance(benchmark, RevisitedSet):
        ids = benchmark.queries
    elif isinstance(benchmark, CaptionSet):
        ids = [f"{caption}\x00{image}" for caption, image in zip(benchmark.captions, benchmark.caption_image.tolist())]
    else:
        raise TypeError(f"no queries known for a {type(benchmark).__name__}")
    digest = hashlib.sha256()
    for item in ids:
        digest.update(item.encode() + b"\x01")
    return digest.hexdigest()


def scores_frame(results: Iterable[ColumnResult]) -> pl.DataFrame:
    """Long table ``column, variant, metric, query, score`` of every result's per-query scores."""
    parts = [per_query_frame(r.per_query).select(pl.lit(r.column).alias("column"), pl.all())
             for r in results if r.per_query]
    return pl.concat(parts) if parts else pl.DataFrame(schema=SCORES_SCHEMA)


def attach_scores(results: Iterable[ColumnResult], frame: pl.DataFrame) -> list[ColumnResult]:
    """``results`` with their per-query scores from a :func:`scores_frame` table.

    Every variant of a result must have scores of every metric whose mean is the stored value; otherwise the
    table belongs to another evaluation and the error names the column and the fix.
    """
    out = []
    for result in results:
        rows = frame.filter(pl.col("column") == result.column)
        if result.skipped or not result.metrics:
            out.append(result)
            continue
        missing = sorted(set(result.metrics) - set(rows["variant"].unique().to_list()))
        if missing:
            raise ValueError(f"{result.column}: no per-query scores of {', '.join(missing)}; re-evaluate the column")
        per_query = {v: variant_scores(rows, v) for v in result.metrics}
        for variant, values in result.metrics.items():
            means = point_values(per_query[variant])
            if set(means) != set(values) or not all(np.isclose(means[k], x, rtol=0, atol=1e-9, equal_nan=True)
                                                    for k, x in values.items()):
                raise ValueError(f"{result.column}: the per-query scores of {variant} do not average to its stored "
                                 "values (written by another evaluation); re-evaluate the column")
        out.append(replace(result, per_query=per_query))
    return out


def merge_variants(first: ColumnResult, second: ColumnResult) -> ColumnResult:
    """One column's results of two evaluations as one result with the variants of both (``second``'s values on a
    name clash); ``second`` as it is when either was skipped. Both must have measured the same queries, or
    their scores cannot be paired."""
    if first.column != second.column:
        raise ValueError(f"cannot merge results of {first.column} and {second.column}")
    if first.skipped or second.skipped:
        return second
    if first.queries and second.queries and first.queries != second.queries:
        raise ValueError(f"{first.column}: the two evaluations measured different queries (other roots or "
                         "benchmark files); evaluate both with the same roots")
    return ColumnResult(first.column, {**first.metrics, **second.metrics}, None, {**first.seconds, **second.seconds},
                        {**first.model_keys, **second.model_keys}, second.queries or first.queries,
                        {**first.per_query, **second.per_query})


def table_values(results: Iterable[ColumnResult]) -> dict[str, dict[str, float]]:
    """``{variant: {column: headline value}}`` of the evaluated (not skipped) results."""
    values: dict[str, dict[str, float]] = {}
    for result in results:
        for variant in result.metrics:
            values.setdefault(variant, {})[result.column] = result.headline(variant)
    return values


def json_safe(value: Any) -> Any:
    """``value`` (nested dicts, lists, floats) with every NaN as ``None``, for strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def skipped_reasons(results: Iterable[ColumnResult]) -> dict[str, str]:
    """``{column: reason}`` of the skipped results."""
    return {result.column: result.skipped for result in results if result.skipped}
