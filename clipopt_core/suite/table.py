"""Table 1: rows are variants, columns the benchmarks present, the four group means and AVG, in percent.

AVG is the plain mean of the benchmark columns (docs/method.md#benchmark-suite), not the mean of the group
means; a group mean and AVG cover only the columns present, and their headers say so (``AVG (12/14)``)
when some are missing. Each variant but the baseline gets a row of its difference to the baseline
(``· vs baseline``), with the 95% paired-bootstrap interval of each difference where the per-query scores
are known (:func:`clipopt_core.suite.intervals.table_intervals`). When the paper reports the same base
model, each variant it reports gets two more rows: the paper's figures over the same columns (``· paper``)
and ours minus the paper's (``· Δ``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from clipopt_core.evaluate.aggregate import group_means
from clipopt_core.evaluate.bootstrap import Interval
from clipopt_core.runtime.text import markdown_table
from clipopt_core.suite.columns import COLUMNS, GROUP_LABELS, GROUPS, Column

SUMMARY_KEYS: tuple[str, ...] = (*(f"{group}_mean" for group in GROUPS), "avg")


@dataclass(frozen=True)
class Table1:
    """``columns``: the columns with a result, in paper order. ``rows``: one dict per row with ``variant``,
    ``source`` (``ours``, ``change`` = ours minus the baseline's, ``paper`` or ``delta`` = ours minus the
    paper's), a percent per column name and per :data:`SUMMARY_KEYS` (``nan`` where unknown); ``change`` rows
    also hold ``<key>_lo``/``<key>_hi``, the interval's bounds in points. ``skipped``: column → why it has no
    result. ``baseline``: the variant the ``change`` rows refer to."""

    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]
    skipped: dict[str, str] = field(default_factory=dict)
    paper_source: str | None = None
    baseline: str = "baseline"

    @property
    def partial(self) -> bool:
        return len(self.columns) < len(COLUMNS)

    def headers(self) -> dict[str, str]:
        """Display header of every value key: ``kNN IN-V`` for columns, ``I2I (3/4)`` / ``AVG (12/14)`` for means."""
        out = {column.name: f"{GROUP_LABELS[column.group]} {column.label}" for column in self.columns}
        for group in GROUPS:
            present = sum(column.group == group for column in self.columns)
            total = sum(column.group == group for column in COLUMNS)
            out[f"{group}_mean"] = GROUP_LABELS[group] + ("" if present == total else f" ({present}/{total})")
        out["avg"] = "AVG" + ("" if not self.partial else f" ({len(self.columns)}/{len(COLUMNS)})")
        return out

    def markdown(self) -> str:
        """The table as markdown, then the skipped columns and the paper's source."""
        headers = self.headers()
        lines = [markdown_table([{"variant": _row_label(row, self.baseline),
                                  **{headers[k]: _cell(row, k) for k in headers}} for row in self.rows])]
        if any(row["source"] == "change" for row in self.rows):
            lines.append(f"\n`· vs {self.baseline}`: difference in points with its 95% paired-bootstrap interval over "
                         "the queries (* = the interval excludes 0).")
        if self.skipped:
            lines.append("\nSkipped:\n" + "\n".join(f"- {name}: {why}" for name, why in self.skipped.items()))
        if self.paper_source:
            lines.append(f"\nPaper figures: {self.paper_source}; group means and AVG over the columns present.")
        return "\n".join(lines)


def build_table1(results: Mapping[str, Mapping[str, float]], *, paper: Mapping[str, Mapping[str, float]] | None = None,
                 paper_source: str | None = None, skipped: Mapping[str, str] | None = None,
                 baseline: str = "baseline", intervals: Mapping[str, Mapping[str, Interval]] | None = None) -> Table1:
    """Table 1 of ``results`` ``{variant: {column: value in [0, 1]}}``.

    ``baseline``: when it is one of ``results``, every other variant gets a ``change`` row, with ``intervals``
    ``{variant: {"delta_<key>": (lo, hi)}}`` in [0, 1] units where given
    (:func:`~clipopt_core.suite.intervals.table_intervals`).
    ``paper``: ``{variant: {column: percent}}`` of the same base model (:func:`clipopt_core.suite.paper.paper_rows`);
    a variant in both gets a paper row and a difference row over the columns present in ours.
    """
    present = tuple(c for c in COLUMNS if any(_finite(values.get(c.name)) for values in results.values()))
    names = [c.name for c in present]
    percents = {variant: {name: 100.0 * float(values[name]) if _finite(values.get(name)) else float("nan")
                          for name in names} for variant, values in results.items()}
    rows: list[dict[str, Any]] = []
    for variant, values in percents.items():
        ours = _with_means(values, present)
        rows.append({"variant": variant, "source": "ours", **ours})
        if variant != baseline and baseline in percents:
            rows.append(_change_row(variant, values, percents[baseline], present, (intervals or {}).get(variant, {})))
        theirs = (paper or {}).get(variant)
        if theirs:
            reference = _with_means({name: float(theirs.get(name, float("nan"))) for name in names}, present)
            rows.append({"variant": variant, "source": "paper", **reference})
            rows.append({"variant": variant, "source": "delta", **{k: ours[k] - reference[k] for k in ours}})
    return Table1(present, tuple(rows), dict(skipped or {}), paper_source if paper else None, baseline)


def _change_row(variant: str, values: Mapping[str, float], base: Mapping[str, float], present: tuple[Column, ...],
                intervals: Mapping[str, Interval]) -> dict[str, Any]:
    """Ours minus the baseline's per column; group means and AVG of those differences (the columns both have,
    as the bootstrap pairs them), each with its interval's bounds ×100 where known."""
    change = _with_means({name: values[name] - base[name] for name in values}, present)
    row: dict[str, Any] = {"variant": variant, "source": "change", **change}
    for key in change:
        lo, hi = intervals.get(f"delta_{key}", (float("nan"), float("nan")))
        row[f"{key}_lo"], row[f"{key}_hi"] = 100 * lo, 100 * hi
    return row


def _with_means(values: dict[str, float], present: tuple[Column, ...]) -> dict[str, float]:
    groups = {group: [c.name for c in present if c.group == group] for group in GROUPS}
    return {**values, **group_means(values, groups)}


def _finite(value: Any) -> bool:
    return value is not None and float(value) == float(value)


def _row_label(row: Mapping[str, Any], baseline: str) -> str:
    suffix = {"ours": "", "change": f" · vs {baseline}", "delta": " · Δ", "paper": " · paper"}[row["source"]]
    return f"{row['variant']}{suffix}"


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not _finite(value):
        return "–"
    if row["source"] == "delta":
        return f"{value:+.1f}"
    if row["source"] != "change":
        return f"{value:.1f}"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if not (_finite(lo) and _finite(hi)):
        return f"{value:+.1f}"
    return f"{value:+.1f} [{lo:+.1f}, {hi:+.1f}]" + ("*" if lo > 0 or hi < 0 else "")
