"""The evaluation report: paper columns, intervals, deltas, markdown, teaser plot and both galleries."""
import io
import math

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from clipopt_core.evaluate.bootstrap import paired_bootstrap
from clipopt_core.evaluate.protocol import QUERY_SETS, T2IExample
from clipopt_core.evaluate.report import (
    detail_table,
    gallery_image,
    report_frame,
    teaser_plot,
    text_gallery_image,
    to_markdown,
)

METRICS = {
    "baseline": {"i2i_map": 0.20, "i2i_r1": 0.30, "knn_top1": 0.5, "zs_top1": 0.10, "t2i_r1": 0.1, "t2i_r5": 0.2,
                 "t2i_r10": 0.3, "i2i_mean": 0.25, "knn_mean": 0.5, "zs_mean": 0.1, "t2i_mean": 0.2, "avg": 0.26},
    "stage1": {"i2i_map": 0.30, "i2i_r1": 0.40, "knn_top1": 0.6, "zs_top1": 0.05, "t2i_r1": 0.05, "t2i_r5": 0.1,
               "t2i_r10": 0.2, "i2i_mean": 0.35, "knn_mean": 0.6, "zs_mean": 0.05, "t2i_mean": 0.1, "avg": 0.29},
}


def _scores() -> dict[str, dict[str, np.ndarray]]:
    """Per-query scores whose means are METRICS (i2i/knn/zs over 10 images, T2I over 20 captions)."""
    def hits(mean: float, n: int) -> np.ndarray:
        return (np.arange(n) < round(mean * n)).astype(float)
    return {v: {"i2i_map": np.full(10, m["i2i_map"]), "i2i_r1": hits(m["i2i_r1"], 10), "knn_top1": hits(m["knn_top1"], 10),
                "zs_top1": hits(m["zs_top1"], 20), "t2i_r5": hits(m["t2i_r5"], 20)}
            for v, m in METRICS.items()}


def test_report_frame_orders_variants_and_computes_deltas():
    frame = report_frame({"stage1": METRICS["stage1"], "baseline": METRICS["baseline"]})
    assert frame["variant"].to_list() == ["baseline", "stage1"]
    stage1 = frame.filter(pl.col("variant") == "stage1").row(0, named=True)
    assert stage1["delta_i2i_map"] == pytest.approx(0.10)
    assert stage1["delta_zs_top1"] == pytest.approx(-0.05)
    assert stage1["delta_avg"] == pytest.approx(0.03)
    assert frame.filter(pl.col("variant") == "baseline")["delta_t2i_r5"][0] == 0.0
    assert "i2i_map_lo" not in frame.columns  # no intervals given


def test_report_frame_carries_intervals_for_metrics_and_deltas():
    scores = _scores()
    sets = {**QUERY_SETS, "zs_top1": "zs"}  # the toy zero-shot scores have their own query count
    intervals = paired_bootstrap(scores, sets)
    frame = report_frame(METRICS, intervals)
    stage1 = frame.filter(pl.col("variant") == "stage1").row(0, named=True)
    assert stage1["i2i_map_lo"] == stage1["i2i_map_hi"] == pytest.approx(0.30)  # constant AP: no spread
    assert stage1["delta_i2i_map_lo"] == pytest.approx(0.10)
    assert stage1["t2i_r5_lo"] <= 0.1 <= stage1["t2i_r5_hi"]
    assert stage1["delta_t2i_r5_lo"] < -0.05 < stage1["delta_t2i_r5_hi"] <= 0.0
    assert math.isnan(stage1["t2i_cls_r5_lo"])  # not measured -> nan interval
    baseline = frame.filter(pl.col("variant") == "baseline").row(0, named=True)
    assert baseline["delta_avg_lo"] == baseline["delta_avg_hi"] == 0.0


def test_missing_metric_is_nan_not_an_error():
    frame = report_frame({"baseline": {"i2i_map": 0.5}})
    assert frame["t2i_r5"][0] != frame["t2i_r5"][0]  # NaN


def test_detail_table_shows_percentages_with_signed_deltas():
    text = detail_table(report_frame(METRICS), columns=("i2i_map", "zs_top1", "t2i_cls_r5"))
    lines = text.splitlines()
    assert lines[0] == "| variant | i2i_map | zs_top1 | t2i_cls_r5 |"
    assert lines[2] == "| baseline | 20.0 | 10.0 | – |"
    assert lines[3] == "| stage1 | 30.0 (+10.0) | 5.0 (-5.0) | – |"


def test_markdown_has_the_paper_columns_intervals_and_significance_marks():
    frame = report_frame(METRICS, paired_bootstrap(_scores(), {**QUERY_SETS, "zs_top1": "zs"}))
    text = to_markdown(frame)
    lines = text.splitlines()
    header = "| variant | I2I mAP | I2I R@1 | kNN top-1 | ZS top-1 | T2I R@5 | AVG |"
    assert lines[0].startswith("### Results") and lines[2] == header
    assert lines[4].startswith("| baseline | 20.0 [20.0, 20.0] | 30.0 [")
    change = lines[lines.index("### Change vs baseline (points; * = the interval excludes 0)") + 4]
    assert change.startswith("| stage1 | +10.0 [+10.0, +10.0]* | ")
    assert "### All columns" in text and "t2i_cls_r5" in text


def test_teaser_plot_is_a_png_with_and_without_intervals():
    for frame in (report_frame(METRICS), report_frame(METRICS, paired_bootstrap(_scores(), {**QUERY_SETS, "zs_top1": "zs"}))):
        image = Image.open(io.BytesIO(teaser_plot(frame)))
        assert image.format == "PNG" and image.size == (500, 400)
    no_pairs = {v: {**m, "t2i_mean": math.nan, "t2i_cls_r5": 0.3} for v, m in METRICS.items()}
    assert Image.open(io.BytesIO(teaser_plot(report_frame(no_pairs)))).format == "PNG"


def _colour_files(tmp_path, colours):
    uris = []
    for number, colour in enumerate(colours):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{number}.png")
        uris.append(str(tmp_path / f"{number}.png"))
    return uris


def test_gallery_puts_the_nearest_neighbours_next_to_each_query(tmp_path):
    uris = _colour_files(tmp_path, [(255, 0, 0), (250, 5, 5), (0, 0, 255), (0, 5, 250)])
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    png = gallery_image(uris, {"baseline": embeddings, "stage1": embeddings}, [0, 2], top_k=1, thumb=10)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (110 + 2 * 10, 2 * 2 * 10)
    # row 0: query 0 (red) then its nearest neighbour 1 (red); row 1: query 2 (blue) then 3 (blue)
    assert image.getpixel((115, 5))[0] > 200 and image.getpixel((125, 5))[0] > 200
    assert image.getpixel((115, 15))[2] > 200 and image.getpixel((125, 15))[2] > 200


def test_text_gallery_shows_each_variants_top_images_framed_by_relevance(tmp_path):
    white, blue = _colour_files(tmp_path, [(255, 255, 255), (0, 0, 255)])
    examples = {"stage1": [T2IExample("a blue square", [white, blue], [False, True])],
                "baseline": [T2IExample("a blue square", [blue, white], [True, False])]}
    image = Image.open(io.BytesIO(text_gallery_image(examples, thumb=20))).convert("RGB")
    assert image.size == (110 + 2 * 20, 16 + 2 * 20)
    # baseline first (VARIANTS order): blue image framed green at rank 1, white framed red at rank 2
    assert image.getpixel((110, 16)) == (40, 170, 60) and image.getpixel((120, 26))[2] > 200
    assert image.getpixel((130, 16)) == (220, 40, 40) and image.getpixel((140, 26)) == (255, 255, 255)
    # stage1 row below: the order swapped
    assert image.getpixel((120, 46)) == (255, 255, 255) and image.getpixel((130, 36)) == (40, 170, 60)
    with pytest.raises(ValueError, match="has query"):
        text_gallery_image({"baseline": examples["baseline"], "stage1": [T2IExample("other", [white], [False])]})
