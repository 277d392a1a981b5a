"""Plain-text renderings shared by the CLI, the Dagster metadata and the Pipes child's logs."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def markdown_table(rows: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """A markdown table of ``rows`` (columns from the first row; floats to ``digits`` decimals)."""
    if not rows:
        return "(empty)"
    columns = list(rows[0])
    cell = lambda value: f"{value:.{digits}f}" if isinstance(value, float) else str(value)  # noqa: E731
    return "\n".join(["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|",
                      *("| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows)])


def format_event(event: Mapping[str, Any]) -> str:
    """One training event (a step or a validation) as ``key=value`` pairs, floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items())


def is_loggable(event: Mapping[str, Any], every: int) -> bool:
    """Validations always, steps every ``every``-th: what goes to a run log."""
    return "val_score" in event or int(event.get("step", 0)) % every == 0
