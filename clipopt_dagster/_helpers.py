"""Small shared pieces of the asset modules: store keys, model loading, metadata formatting."""

import base64
from typing import Any, Mapping

import dagster as dg
import polars as pl


GPU_POOL = "clipopt_gpu"
TRAINING_RETRY = dg.RetryPolicy(max_retries=2, delay=5)


def md_table(rows: list[Mapping[str, Any]] | pl.DataFrame, digits: int = 3) -> dg.MetadataValue:
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows)
    if frame.is_empty():
        return dg.MetadataValue.md("(empty)")
    header = "| " + " | ".join(frame.columns) + " |\n" + "|---" * len(frame.columns) + "|\n"
    body = "\n".join("| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in frame.iter_rows())
    return dg.MetadataValue.md(header + body)


def png_markdown(png: bytes, title: str) -> dg.MetadataValue:
    """Inline a PNG in markdown metadata so the UI shows the picture itself."""
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def step_logger(context: dg.AssetExecutionContext, every: int = 10):
    """Event sink for training: every ``every`` steps and every validation go to the run log."""
    def _log(event: dict[str, float]) -> None:
        if "val_score" in event or int(event.get("step", 0)) % every == 0:
            context.log.info(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items()))
    return _log
