"""Run Table 1 columns for one or more models: load the benchmark once, evaluate every model on it.

Shared by ``clipopt benchmark-suite`` (one model, many columns) and the ``benchmark_suite`` Dagster asset
(one column per partition, every variant). A column whose roots are not configured is *skipped* with the
reason (:meth:`clipopt_core.suite.columns.Column.missing`); a configured root that does not hold the
official layout fails with the loader's :class:`~clipopt_core.suite.types.BenchmarkLayoutError`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

from clipopt_core.suite.columns import Column, SuiteOptions, get_column
from clipopt_core.suite.embedding import SuiteEmbedder


@dataclass(frozen=True)
class ColumnResult:
    """One column's outcome: ``metrics`` ``{variant: {metric: value in [0, 1]}}`` (all the protocol's outputs,
    e.g. easy/medium/hard or R@1/5/10), or ``skipped`` with the reason; ``seconds`` of wall time per variant;
    ``model_keys``: ``{variant: key of the weights evaluated}`` (set by the caller), so a report can tell a
    result of older weights."""

    column: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    model_keys: dict[str, str] = field(default_factory=dict)

    def headline(self, variant: str) -> float:
        """The Table 1 value of ``variant`` (the column's headline metric, in [0, 1])."""
        return self.metrics[variant][get_column(self.column).metric]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> "ColumnResult":
        get_column(str(payload["column"]))  # an unknown column is an error naming it
        return cls(str(payload["column"]), {v: dict(m) for v, m in payload.get("metrics", {}).items()},
                   payload.get("skipped"), dict(payload.get("seconds", {})), dict(payload.get("model_keys", {})))


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
    metrics, seconds = {}, {}
    for variant, make_embedder in embedders.items():
        started = time.perf_counter()
        metrics[variant] = column.evaluate(make_embedder(), benchmark, options)
        seconds[variant] = round(time.perf_counter() - started, 2)
        log(f"{column.name} / {variant}: {metrics[variant]} ({seconds[variant]}s)")
    return ColumnResult(column.name, metrics, seconds=seconds)


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
