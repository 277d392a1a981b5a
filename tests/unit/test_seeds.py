"""Seed-sweep summaries against hand-computed means and sample standard deviations."""
import math

import polars as pl
import pytest

from clipopt_core.evaluate.seeds import seed_root, seed_summary, summary_markdown


def test_seed_summary_means_and_sample_sds_of_values_and_deltas() -> None:
    baseline = {"i2i_map": 0.40, "t2i_r5": 0.20}
    per_seed = {0: {"stage1": {"i2i_map": 0.50, "t2i_r5": 0.18}}, 1: {"stage1": {"i2i_map": 0.46, "t2i_r5": 0.16}},
                2: {"stage1": {"i2i_map": 0.48, "t2i_r5": 0.20}}}
    summary = seed_summary(baseline, per_seed)
    row = summary.filter((pl.col("variant") == "stage1") & (pl.col("metric") == "i2i_map")).row(0, named=True)
    assert row["seeds"] == 3 and row["values"] == [0.50, 0.46, 0.48]
    assert row["mean"] == pytest.approx(0.48) and row["delta_mean"] == pytest.approx(0.08)
    assert row["sd"] == pytest.approx(0.02) and row["delta_sd"] == pytest.approx(0.02)  # sqrt((0.02²+0.02²)/2)
    t2i = summary.filter((pl.col("variant") == "stage1") & (pl.col("metric") == "t2i_r5")).row(0, named=True)
    assert t2i["delta_mean"] == pytest.approx(-0.02) and t2i["sd"] == pytest.approx(0.02)
    base = summary.filter(pl.col("variant") == "baseline")
    assert base["sd"].to_list() == [0.0, 0.0] and base["delta_mean"].to_list() == [0.0, 0.0]
    markdown = summary_markdown(summary)
    assert "| stage1 | 48.0 ± 2.0 (+8.0 ± 2.0) | 18.0 ± 2.0 (-2.0 ± 2.0) |" in markdown
    assert "| baseline | 40.0 ± 0.0 | 20.0 ± 0.0 |" in markdown


def test_one_seed_has_zero_sd_and_a_variant_missing_in_a_seed_is_left_out() -> None:
    summary = seed_summary({"m": 0.5}, {0: {"mcip": {"m": 0.6}, "2sft": {"m": 0.7}}, 1: {"mcip": {"m": 0.8}}})
    assert set(summary["variant"]) == {"baseline", "mcip"}
    one = seed_summary({"m": 0.5}, {4: {"mcip": {"m": 0.6}}}).filter(pl.col("variant") == "mcip").row(0, named=True)
    assert one["sd"] == 0.0 and math.isclose(one["delta_mean"], 0.1)
    assert seed_root(3) == "sweeps/seed-3/models"
