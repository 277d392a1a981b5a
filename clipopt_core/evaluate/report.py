"""The evaluation report: one row per variant in the paper's columns, bootstrap intervals, deltas to the
baseline, a teaser plot with error bars, and image→image / text→image galleries (docs/method.md, "Evaluation")."""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import polars as pl
import torch

from clipopt_core.data.datasets import load_image
from clipopt_core.evaluate.bootstrap import Interval
from clipopt_core.evaluate.metrics import nearest_neighbours
from clipopt_core.evaluate.protocol import METRIC_COLUMNS, T2IExample
from clipopt_core.registry import VARIANTS

GROUP_COLUMNS = ("i2i_mean", "knn_mean", "zs_mean", "t2i_mean", "avg")
# The paper's table: I2I (mAP, R@1), kNN, ZS, T2I (R@5 on held-out pairs) and AVG, their plain mean.
HEADLINE = {"i2i_map": "I2I mAP", "i2i_r1": "I2I R@1", "knn_top1": "kNN top-1", "zs_top1": "ZS top-1",
            "t2i_r5": "T2I R@5", "avg": "AVG"}
REPORT_COLUMNS = (*METRIC_COLUMNS, *GROUP_COLUMNS)


def report_frame(metrics_by_variant: Mapping[str, Mapping[str, float]],
                 intervals: Mapping[str, Mapping[str, Interval]] | None = None) -> pl.DataFrame:
    """Rows in :data:`VARIANTS` order (those present): every column of :data:`REPORT_COLUMNS`, ``delta_<c>`` to
    the baseline, and with ``intervals`` (from :func:`clipopt_core.evaluate.bootstrap.paired_bootstrap`)
    ``<c>_lo``/``<c>_hi`` and ``delta_<c>_lo``/``delta_<c>_hi``; a missing value is ``nan``."""
    rows = []
    for variant in (v for v in VARIANTS if v in metrics_by_variant):
        row = {"variant": variant, **{c: float(metrics_by_variant[variant].get(c, math.nan)) for c in REPORT_COLUMNS}}
        if intervals is not None:
            bounds = intervals.get(variant, {})
            for name in (*REPORT_COLUMNS, *(f"delta_{c}" for c in REPORT_COLUMNS)):
                row[f"{name}_lo"], row[f"{name}_hi"] = bounds.get(name, (math.nan, math.nan))
        rows.append(row)
    frame = pl.DataFrame(rows)
    if "baseline" not in metrics_by_variant:
        return frame
    baseline = frame.filter(pl.col("variant") == "baseline").row(0, named=True)
    return frame.with_columns([(pl.col(c) - baseline[c]).alias(f"delta_{c}") for c in REPORT_COLUMNS])


def to_markdown(frame: pl.DataFrame) -> str:
    """The report as markdown: the paper's columns with 95% intervals, the change vs the baseline, then every column."""
    parts = ["### Results (×100; 95% paired-bootstrap interval in brackets)", _headline_table(frame, delta=False)]
    if "delta_avg" in frame.columns and frame.height > 1:
        parts += ["### Change vs baseline (points; * = the interval excludes 0)",
                  _headline_table(frame.filter(pl.col("variant") != "baseline"), delta=True)]
    parts += ["### All columns (×100; change vs baseline in parentheses)", detail_table(frame)]
    return "\n\n".join(parts)


def _headline_table(frame: pl.DataFrame, *, delta: bool) -> str:
    present = [c for c in HEADLINE if c in frame.columns]
    lines = ["| variant | " + " | ".join(HEADLINE[c] for c in present) + " |", "|---" * (len(present) + 1) + "|"]
    for row in frame.iter_rows(named=True):
        name = (lambda c: f"delta_{c}") if delta else (lambda c: c)
        cells = [_with_interval(row, name(c), signed=delta) for c in present]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_interval(row: Mapping[str, float], column: str, *, signed: bool) -> str:
    value, lo, hi = row.get(column), row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if value is None or value != value:
        return "–"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = fmt.format(100 * value)
    if lo is not None and hi is not None and lo == lo and hi == hi:
        text += f" [{fmt.format(100 * lo)}, {fmt.format(100 * hi)}]"
        if signed and (lo > 0 or hi < 0):
            text += "*"
    return text


def detail_table(frame: pl.DataFrame, columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """Markdown table (values ×100, one decimal; deltas to the baseline in parentheses)."""
    present = [c for c in columns if c in frame.columns]
    lines = ["| variant | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for row in frame.iter_rows(named=True):
        cells = []
        for column in present:
            value, delta = row[column], row.get(f"delta_{column}")
            text = "–" if value != value else f"{100 * value:.1f}"
            if delta is not None and row["variant"] != "baseline" and delta == delta:
                text += f" ({100 * delta:+.1f})"
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teaser_plot(frame: pl.DataFrame) -> bytes:
    """PNG bytes: I2I mean vs T2I R@5 (held-out pairs) per variant with 95% error bars, baseline marked.

    Falls back to the class-caption T2I R@5 when no held-out pairs were measured.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_column, y_label = "t2i_mean", "text→image R@5, held-out pairs ×100"
    if frame["t2i_mean"].is_nan().all():
        y_column, y_label = "t2i_cls_r5", "text→image R@5, class captions ×100"
    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    for row in frame.iter_rows(named=True):
        is_base = row["variant"] == "baseline"
        x, y = 100 * row["i2i_mean"], 100 * row[y_column]
        axes.errorbar(x, y, xerr=_error_bar(row, "i2i_mean"), yerr=_error_bar(row, y_column), fmt="*" if is_base else "o",
                      markersize=10 if is_base else 7, color="black" if is_base else None, capsize=3, zorder=3)
        axes.annotate(row["variant"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    axes.set_xlabel("image→image (mean of mAP, R@1) ×100")
    axes.set_ylabel(y_label)
    axes.set_title("One embedding for both searches (95% intervals)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _error_bar(row: Mapping[str, float], column: str) -> list[list[float]] | None:
    """``[[below], [above]]`` ×100 from the row's interval, or ``None`` without one."""
    value, lo, hi = row[column], row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if lo is None or hi is None or lo != lo or hi != hi:
        return None
    return [[100 * max(value - lo, 0.0)], [100 * max(hi - value, 0.0)]]


def gallery_image(uris: Sequence[str], embeddings_by_variant: Mapping[str, torch.Tensor], query_rows: Sequence[int],
                  *, top_k: int = 5, thumb: int = 64) -> bytes:
    """PNG bytes: for each variant and query, the query then its top-``top_k`` neighbours (query excluded).

    ``embeddings_by_variant``: variant → [N, D] normalised embeddings of ``uris`` (same order). With many
    variants or images prefer :func:`neighbour_gallery_image` on each result's ``i2i_examples``.
    """
    rows = torch.tensor(list(query_rows), dtype=torch.long)
    neighbours = {variant: dict(zip(rows.tolist(), nearest_neighbours(embeddings, rows, top_k).tolist()))
                  for variant, embeddings in embeddings_by_variant.items()}
    return neighbour_gallery_image(uris, neighbours, thumb=thumb)


def neighbour_gallery_image(uris: Sequence[str], neighbours_by_variant: Mapping[str, Mapping[int, Sequence[int]]],
                            *, thumb: int = 64) -> bytes:
    """PNG bytes: for each variant (registry order) and query row, the query then its neighbour rows.

    ``neighbours_by_variant``: variant → {query row: neighbour rows, nearest first} (rows index ``uris``), e.g.
    :attr:`clipopt_core.evaluate.protocol.EvalResult.i2i_examples`.
    """
    from PIL import Image, ImageDraw

    variants = [v for v in VARIANTS if v in neighbours_by_variant]
    top_k = max((len(rows) for v in variants for rows in neighbours_by_variant[v].values()), default=0)
    lines = sum(len(neighbours_by_variant[v]) for v in variants)
    canvas = Image.new("RGB", ((top_k + 1) * thumb + 110, max(lines * thumb, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    cache: dict[int, Image.Image] = {}

    def tile(row: int) -> Image.Image:
        if row not in cache:
            cache[row] = load_image(uris[row]).resize((thumb, thumb))
        return cache[row]

    y = 0
    for variant in variants:
        for query, neighbours in neighbours_by_variant[variant].items():
            draw.text((4, y + thumb // 2 - 6), variant, fill="black")
            for column, row in enumerate([query, *neighbours]):
                canvas.paste(tile(row), (110 + column * thumb, y))
            y += thumb
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def text_gallery_image(examples_by_variant: Mapping[str, Sequence[T2IExample]], *, thumb: int = 64) -> bytes:
    """PNG bytes: for each held-out caption (a text line), one row per variant with its top-k images;
    relevant images are framed green, others red. The variants must share the queries (they do when
    produced by :func:`clipopt_core.evaluate.protocol.evaluate_model` on the same pairs)."""
    from PIL import Image, ImageDraw

    variants = [v for v in VARIANTS if v in examples_by_variant]
    queries = [e.query for e in examples_by_variant[variants[0]]] if variants else []
    top_k = max((len(e.uris) for v in variants for e in examples_by_variant[v]), default=0)
    label, line = 110, 16
    canvas = Image.new("RGB", (label + max(top_k, 1) * thumb, max(len(queries) * (line + len(variants) * thumb), 1)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    cache: dict[str, Image.Image] = {}
    y = 0
    for number, query in enumerate(queries):
        draw.text((4, y + 2), f"“{query}”", fill="black")
        y += line
        for variant in variants:
            example = examples_by_variant[variant][number]
            if example.query != query:
                raise ValueError(f"variant {variant!r} has query {example.query!r} where {query!r} was expected")
            draw.text((4, y + thumb // 2 - 6), variant, fill="black")
            for column, (uri, relevant) in enumerate(zip(example.uris, example.relevant)):
                if uri not in cache:
                    cache[uri] = load_image(uri).resize((thumb - 4, thumb - 4))
                left = label + column * thumb
                draw.rectangle((left, y, left + thumb - 1, y + thumb - 1), fill=(40, 170, 60) if relevant else (220, 40, 40))
                canvas.paste(cache[uri], (left + 2, y + 2))
            y += thumb
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
