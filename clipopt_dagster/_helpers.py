"""Small shared pieces of the asset modules: pools, retry policy, metadata formatting."""

import base64
from typing import Any, Callable, Mapping

import dagster as dg
import polars as pl

from clipopt_core.runtime.text import format_event, is_loggable, markdown_table

GPU_POOL = "clipopt_gpu"
TRAINING_RETRY = dg.RetryPolicy(max_retries=2, delay=5)


def md_table(rows: list[Mapping[str, Any]] | pl.DataFrame, digits: int = 3) -> dg.MetadataValue:
    """A markdown metadata table of ``rows`` (a frame or a list of dicts)."""
    return dg.MetadataValue.md(markdown_table(rows.to_dicts() if isinstance(rows, pl.DataFrame) else rows, digits))


def png_markdown(png: bytes, title: str) -> dg.MetadataValue:
    """Inline a PNG in markdown metadata so the UI shows the picture itself."""
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def step_logger(context: dg.AssetExecutionContext, every: int = 10) -> Callable[[dict[str, float]], None]:
    """Event sink for training: every ``every`` steps and every validation go to the run log."""
    def _log(event: dict[str, float]) -> None:
        if is_loggable(event, every):
            context.log.info(format_event(event))
    return _log
