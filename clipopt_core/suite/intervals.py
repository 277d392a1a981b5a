"""Paired-bootstrap intervals for Table 1: each variant's difference to the baseline per column, group mean and AVG.

docs/method.md#benchmark-suite. The resampling is :func:`clipopt_core.evaluate.bootstrap.paired_bootstrap`,
with the evaluation report's settings by default (B = 1000 resamples, 95%, seed 0). A column's queries are
drawn with the same indices for the variant and the baseline (a paired bootstrap). Columns measured on the
same queries (equal :attr:`~clipopt_core.suite.run.ColumnResult.queries` digests, e.g. kNN and zero-shot on
ImageNet val) form one query set and share the indices; every other column is resampled independently.
Group means and AVG are recomputed in each resample over the columns present.
"""
from __future__ import annotations

from typing import Iterable

from clipopt_core.evaluate.bootstrap import BootstrapConfig, Interval, paired_bootstrap
from clipopt_core.suite.columns import COLUMNS, GROUPS, get_column
from clipopt_core.suite.run import ColumnResult

SUITE_GROUPS: dict[str, list[str]] = {group: [c.name for c in COLUMNS if c.group == group] for group in GROUPS}


def query_sets(results: Iterable[ColumnResult]) -> dict[str, str]:
    """``{column: query set}``: columns with the same query digest share a set; no digest: the column's own."""
    return {result.column: result.queries or result.column for result in results}


def table_intervals(results: Iterable[ColumnResult], *, baseline: str = "baseline",
                    config: BootstrapConfig = BootstrapConfig()) -> dict[str, dict[str, Interval]]:
    """``{variant: {"delta_<key>": (lo, hi)}}`` of every variant but ``baseline``, as fractions (like the values).

    Keys are column names, ``<group>_mean`` and ``avg``. A column gets an interval where both the variant and
    the baseline have per-query scores of it; a group mean (and AVG) only when every column it averages in the
    table has them, so an interval never covers other columns than its value.
    """
    evaluated = [r for r in results if not r.skipped and baseline in r.metrics]
    sets = query_sets(evaluated)
    cohorts: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}  # variants on the same columns: one call
    for variant in dict.fromkeys(v for r in evaluated for v in r.metrics if v != baseline):
        both = tuple(r.column for r in evaluated if variant in r.metrics)
        scored = tuple(r.column for r in evaluated if baseline in r.per_query and variant in r.per_query)
        cohorts.setdefault((both, scored), []).append(variant)
    out: dict[str, dict[str, Interval]] = {}
    for (both, scored), variants in cohorts.items():
        scores = {name: {r.column: r.per_query[name][get_column(r.column).metric] for r in evaluated
                         if r.column in scored} for name in (baseline, *variants)}
        groups = _complete_groups(both, set(scored))
        intervals = paired_bootstrap(scores, sets, baseline=baseline, groups=groups, config=config)
        for variant in variants:
            out[variant] = {key: bounds for key, bounds in intervals[variant].items() if key.startswith("delta_")
                            and (groups == SUITE_GROUPS or key != "delta_avg")}  # else AVG covers fewer columns
    return out


def _complete_groups(columns: Iterable[str], scored: set[str]) -> dict[str, list[str]]:
    """The groups of :data:`SUITE_GROUPS` whose ``columns`` (those in the table) all have scores."""
    present = set(columns)
    return {group: names for group, names in SUITE_GROUPS.items() if {n for n in names if n in present} <= scored}

