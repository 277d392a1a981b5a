"""The evaluation report: deltas to the baseline, markdown, teaser plot and gallery."""
import io

import polars as pl
import pytest
import torch
from PIL import Image

from clipopt_core.evaluate.report import gallery_image, report_frame, teaser_plot, to_markdown

METRICS = {
    "baseline": {"i2i_map": 0.20, "i2i_r1": 0.30, "knn_top1": 0.5, "zs_top1": 0.10, "t2i_r1": 0.1, "t2i_r5": 0.2,
                 "t2i_r10": 0.3, "i2i_mean": 0.25, "knn_mean": 0.5, "zs_mean": 0.1, "t2i_mean": 0.2, "overall_mean": 0.2429},
    "stage1": {"i2i_map": 0.30, "i2i_r1": 0.40, "knn_top1": 0.6, "zs_top1": 0.05, "t2i_r1": 0.05, "t2i_r5": 0.1,
               "t2i_r10": 0.2, "i2i_mean": 0.35, "knn_mean": 0.6, "zs_mean": 0.05, "t2i_mean": 0.1167, "overall_mean": 0.2429},
}


def test_report_frame_orders_variants_and_computes_deltas():
    frame = report_frame({"stage1": METRICS["stage1"], "baseline": METRICS["baseline"]})
    assert frame["variant"].to_list() == ["baseline", "stage1"]
    stage1 = frame.filter(pl.col("variant") == "stage1").row(0, named=True)
    assert stage1["delta_i2i_map"] == pytest.approx(0.10)
    assert stage1["delta_zs_top1"] == pytest.approx(-0.05)
    assert frame.filter(pl.col("variant") == "baseline")["delta_t2i_r5"][0] == 0.0


def test_missing_metric_is_nan_not_an_error():
    frame = report_frame({"baseline": {"i2i_map": 0.5}})
    assert frame["t2i_r5"][0] != frame["t2i_r5"][0]  # NaN


def test_markdown_shows_percentages_with_signed_deltas():
    text = to_markdown(report_frame(METRICS), columns=("i2i_map", "zs_top1"))
    lines = text.splitlines()
    assert lines[0] == "| variant | i2i_map | zs_top1 |"
    assert lines[2] == "| baseline | 20.0 | 10.0 |"
    assert lines[3] == "| stage1 | 30.0 (+10.0) | 5.0 (-5.0) |"


def test_teaser_plot_is_a_png():
    png = teaser_plot(report_frame(METRICS))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (500, 400)


def test_gallery_puts_the_nearest_neighbours_next_to_each_query(tmp_path):
    colours = [(255, 0, 0), (250, 5, 5), (0, 0, 255), (0, 5, 250)]
    uris = []
    for number, colour in enumerate(colours):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{number}.png")
        uris.append(str(tmp_path / f"{number}.png"))
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    png = gallery_image(uris, {"baseline": embeddings, "stage1": embeddings}, [0, 2], top_k=1, thumb=10)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (110 + 2 * 10, 2 * 2 * 10)
    # row 0: query 0 (red) then its nearest neighbour 1 (red); row 1: query 2 (blue) then 3 (blue)
    assert image.getpixel((115, 5))[0] > 200 and image.getpixel((125, 5))[0] > 200
    assert image.getpixel((115, 15))[2] > 200 and image.getpixel((125, 15))[2] > 200
