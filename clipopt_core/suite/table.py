"""Table 1: rows are variants, columns the benchmarks present, the four group means and AVG, in percent.

AVG is the plain mean of the benchmark columns (docs/method.md#benchmark-suite), not the mean of the group
means; a group mean and AVG cover only the columns present, and their headers say so (``AVG (12/14)``)
when some are missing. When the paper reports the same base model, each variant it reports gets two
more rows: the paper's figures over the same columns (``· paper``) and ours minus the paper's (``· Δ``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from clipopt_core.evaluate.aggregate import group_means
from clipopt_core.runtime.text import markdown_table
from clipopt_core.suite.columns import COLUMNS, GROUP_LABELS, GROUPS, Column

SUMMARY_KEYS: tuple[str, ...] = (*(f"{group}_mean" for group in GROUPS), "avg")


@dataclass(frozen=True)
class Table1:
    """``columns``: the columns with a result, in paper order. ``rows``: one dict per row with ``variant``,
    ``source`` (``ours``, ``paper`` or ``delta``), a percent per column name and per :data:`SUMMARY_KEYS`
    (``nan`` where unknown). ``skipped``: column → why it has no result."""

    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]
    skipped: dict[str, str] = field(default_factory=dict)
    paper_source: str | None = None

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
        lines = [markdown_table([{"variant": _row_label(row), **{headers[k]: _cell(row, k) for k in headers}}
                                 for row in self.rows])]
        if self.skipped:
            lines.append("\nSkipped:\n" + "\n".join(f"- {name}: {why}" for name, why in self.skipped.items()))
        if self.paper_source:
            lines.append(f"\nPaper figures: {self.paper_source}; group means and AVG over the columns present.")
        return "\n".join(lines)


def build_table1(results: Mapping[str, Mapping[str, float]], *, paper: Mapping[str, Mapping[str, float]] | None = None,
                 paper_source: str | None = None, skipped: Mapping[str, str] | None = None) -> Table1:
    """Table 1 of ``results`` ``{variant: {column: value in [0, 1]}}``.

    ``paper``: ``{variant: {column: percent}}`` of the same base model (:func:`clipopt_core.suite.paper.paper_rows`);
    a variant in both gets a paper row and a difference row over the columns present in ours.
    """
    present = tuple(c for c in COLUMNS if any(_finite(values.get(c.name)) for values in results.values()))
    names = [c.name for c in present]
    rows: list[dict[str, Any]] = []
    for variant, values in results.items():
        ours = _with_means({name: 100.0 * float(values[name]) if _finite(values.get(name)) else float("nan")
                            for name in names}, present)
        rows.append({"variant": variant, "source": "ours", **ours})
        theirs = (paper or {}).get(variant)
        if theirs:
            reference = _with_means({name: float(theirs.get(name, float("nan"))) for name in names}, present)
            rows.append({"variant": variant, "source": "paper", **reference})
            rows.append({"variant": variant, "source": "delta", **{k: ours[k] - reference[k] for k in ours}})
    return Table1(present, tuple(rows), dict(skipped or {}), paper_source if paper else None)


def _with_means(values: dict[str, float], present: tuple[Column, ...]) -> dict[str, float]:
    groups = {group: [c.name for c in present if c.group == group] for group in GROUPS}
    return {**values, **group_means(values, groups)}


def _finite(value: Any) -> bool:
    return value is not None and float(value) == float(value)


def _row_label(row: Mapping[str, Any]) -> str:
    return row["variant"] if row["source"] == "ours" else f"{row['variant']} · {'Δ' if row['source'] == 'delta' else 'paper'}"


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not _finite(value):
        return "–"
    return f"{value:+.1f}" if row["source"] == "delta" else f"{value:.1f}"
