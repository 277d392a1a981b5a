"""The evaluation report: one row per variant, deltas to the baseline, a teaser plot and a gallery."""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import polars as pl
import torch

from clipopt_core.data.datasets import load_image
from clipopt_core.evaluate.protocol import METRIC_COLUMNS

VARIANTS = ("baseline", "stage1", "2sft", "mcip", "mcip_realign")
GROUP_COLUMNS = ("i2i_mean", "knn_mean", "zs_mean", "t2i_mean", "overall_mean")


def report_frame(metrics_by_variant: Mapping[str, Mapping[str, float]]) -> pl.DataFrame:
    """Rows in :data:`VARIANTS` order (those present); metric columns plus ``delta_<metric>`` to the baseline."""
    columns = [c for c in (*METRIC_COLUMNS, *GROUP_COLUMNS)]
    rows = [{"variant": v, **{c: float(metrics_by_variant[v].get(c, float("nan"))) for c in columns}}
            for v in VARIANTS if v in metrics_by_variant]
    frame = pl.DataFrame(rows)
    if "baseline" not in metrics_by_variant:
        return frame
    baseline = frame.filter(pl.col("variant") == "baseline").row(0, named=True)
    return frame.with_columns([(pl.col(c) - baseline[c]).alias(f"delta_{c}") for c in columns])


def to_markdown(frame: pl.DataFrame, columns: Sequence[str] = (*METRIC_COLUMNS, *GROUP_COLUMNS)) -> str:
    """Markdown table (values ×100, one decimal; deltas to the baseline in brackets)."""
    present = [c for c in columns if c in frame.columns]
    lines = ["| variant | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for row in frame.iter_rows(named=True):
        cells = []
        for column in present:
            value, delta = row[column], row.get(f"delta_{column}")
            text = f"{100 * value:.1f}"
            if delta is not None and row["variant"] != "baseline" and delta == delta:
                text += f" ({100 * delta:+.1f})"
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teaser_plot(frame: pl.DataFrame) -> bytes:
    """PNG bytes: I2I mean vs T2I mean per variant, baseline marked (the paper's teaser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    for row in frame.iter_rows(named=True):
        is_base = row["variant"] == "baseline"
        axes.scatter(100 * row["i2i_mean"], 100 * row["t2i_mean"], s=90 if is_base else 60,
                     marker="*" if is_base else "o", color="black" if is_base else None, zorder=3)
        axes.annotate(row["variant"], (100 * row["i2i_mean"], 100 * row["t2i_mean"]), textcoords="offset points",
                      xytext=(6, 4), fontsize=9)
    axes.set_xlabel("image→image (mean of mAP, R@1) ×100")
    axes.set_ylabel("text→image (mean of R@1/5/10) ×100")
    axes.set_title("One embedding for both searches")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def gallery_image(uris: Sequence[str], embeddings_by_variant: Mapping[str, torch.Tensor], query_rows: Sequence[int],
                  *, top_k: int = 5, thumb: int = 64) -> bytes:
    """PNG bytes: for each variant and query, the query then its top-``top_k`` neighbours (query excluded).

    ``embeddings_by_variant``: variant → [N, D] normalised embeddings of ``uris`` (same order).
    """
    from PIL import Image, ImageDraw

    variants = [v for v in VARIANTS if v in embeddings_by_variant]
    width = (top_k + 1) * thumb + 110
    canvas = Image.new("RGB", (width, len(variants) * len(query_rows) * thumb), "white")
    draw = ImageDraw.Draw(canvas)
    cache: dict[int, Image.Image] = {}

    def tile(row: int) -> Image.Image:
        if row not in cache:
            cache[row] = load_image(uris[row]).resize((thumb, thumb))
        return cache[row]

    y = 0
    for variant in variants:
        embeddings = embeddings_by_variant[variant]
        for query in query_rows:
            scores = embeddings @ embeddings[query]
            scores[query] = float("-inf")
            neighbours = scores.topk(min(top_k, len(uris) - 1)).indices.tolist()
            draw.text((4, y + thumb // 2 - 6), variant, fill="black")
            for column, row in enumerate([query, *neighbours]):
                canvas.paste(tile(row), (110 + column * thumb, y))
            y += thumb
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
