"""Small shared pieces of the asset modules: store keys, model loading, metadata formatting."""

import base64
from pathlib import Path
from typing import Any, Mapping

import dagster as dg
import polars as pl

from clipopt_core.models import ModelSpec, checkpoint_spec
from clipopt_core.storage import ArtifactStore

GPU_POOL = "clipopt_gpu"
TRAINING_RETRY = dg.RetryPolicy(max_retries=2, delay=5)


class Keys:
    """Store keys of every artifact (one place, so assets and checks agree)."""

    listing = "data/raw_images.parquet"
    manifest = "data/manifest.parquet"
    rejected = "data/rejected.parquet"
    splits = "data/splits.parquet"
    caption_pairs = "data/caption_pairs.parquet"
    caption_pool = "data/caption_pool.parquet"
    base_model = "models/base/spec.json"
    pseudo_captions = "captions/pseudo_captions.parquet"
    report = "reports/evaluation.parquet"
    report_json = "reports/evaluation.json"
    report_md = "reports/evaluation.md"
    teaser = "reports/teaser.png"
    gallery = "reports/gallery.png"
    embeddings = "serving/embeddings.parquet"
    index = "serving/index.faiss"
    index_info = "serving/index.json"

    @staticmethod
    def model(name: str) -> str:
        return f"models/{name}"


def base_spec(store: ArtifactStore) -> ModelSpec:
    return ModelSpec(**store.read_json(Keys.base_model)["spec"])


def stage_spec(store: ArtifactStore, name: str, cache: Path, image_size: int | None) -> ModelSpec:
    """Download the checkpoint folder of asset ``name`` (cached by content hash) and return its spec."""
    return checkpoint_spec(store.get_dir(Keys.model(name), cache / "checkpoints" / name), image_size)


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
