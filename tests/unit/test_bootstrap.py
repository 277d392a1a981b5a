"""Paired bootstrap intervals: hand-checkable cases, pairing, derived columns, determinism."""
import math

import numpy as np
import pytest

from clipopt_core.evaluate.bootstrap import BootstrapConfig, paired_bootstrap

SETS = {"i2i_map": "images", "zs_top1": "images", "t2i_r5": "captions"}


def _scores(rng: np.random.Generator, n: int = 200, m: int = 150) -> dict[str, np.ndarray]:
    return {"i2i_map": rng.random(n), "zs_top1": (rng.random(n) < 0.4).astype(float),
            "t2i_r5": (rng.random(m) < 0.3).astype(float)}


def test_identical_variants_have_a_zero_delta_interval():
    base = _scores(np.random.default_rng(0))
    out = paired_bootstrap({"baseline": base, "copy": {k: v.copy() for k, v in base.items()}}, SETS)
    for column in ("i2i_map", "zs_top1", "t2i_r5", "i2i_mean", "avg"):
        assert out["copy"][f"delta_{column}"] == (0.0, 0.0)
        assert out["copy"][column] == out["baseline"][column]


def test_better_on_every_query_gives_an_interval_above_zero():
    base = _scores(np.random.default_rng(1))
    better = {k: v + 0.01 for k, v in base.items()}
    out = paired_bootstrap({"baseline": base, "better": better}, SETS)
    for column in ("i2i_map", "zs_top1", "t2i_r5", "avg"):
        lo, hi = out["better"][f"delta_{column}"]
        assert lo == pytest.approx(0.01) and hi == pytest.approx(0.01)  # paired: the shift is all there is
    assert out["baseline"]["delta_i2i_map"] == (0.0, 0.0)


def test_pairing_narrows_the_delta_interval_below_the_metric_interval():
    rng = np.random.default_rng(2)
    base = {"i2i_map": rng.random(400)}
    noisy = {"i2i_map": base["i2i_map"] + rng.normal(0.02, 0.01, 400)}
    out = paired_bootstrap({"baseline": base, "v": noisy}, {})
    metric_width = out["v"]["i2i_map"][1] - out["v"]["i2i_map"][0]
    delta_lo, delta_hi = out["v"]["delta_i2i_map"]
    assert delta_hi - delta_lo < metric_width / 5
    assert 0.015 < delta_lo < 0.02 < delta_hi < 0.025


def test_interval_covers_the_mean_and_shrinks_with_more_queries():
    rng = np.random.default_rng(3)
    small, large = (rng.random(50) < 0.5).astype(float), (rng.random(5000) < 0.5).astype(float)
    lo_s, hi_s = paired_bootstrap({"baseline": {"m": small}}, {})["baseline"]["m"]
    lo_l, hi_l = paired_bootstrap({"baseline": {"m": large}}, {})["baseline"]["m"]
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~ 1/sqrt(100)
    # a 95% interval of a proportion: about +-1.96 * sqrt(p(1-p)/n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 5000), rel=0.15)


def test_skipped_queries_are_left_out_and_groups_follow_group_means():
    base = {"i2i_map": np.array([1.0, np.nan, 0.0, 1.0]), "i2i_r1": np.array([1.0, 1.0, 1.0, 1.0]),
            "t2i_r5": np.array([np.nan, np.nan])}
    out = paired_bootstrap({"baseline": base}, {"i2i_map": "images", "i2i_r1": "images"})["baseline"]
    assert 0.0 <= out["i2i_map"][0] <= out["i2i_map"][1] <= 1.0
    assert out["i2i_r1"] == (1.0, 1.0)
    assert all(math.isnan(v) for v in out["t2i_r5"])  # nothing measured
    assert out["i2i_mean"][0] >= 0.5 and out["i2i_mean"][1] <= 1.0
    assert out["avg"] == out["i2i_mean"]  # T2I is nan in every resample, so it drops out of AVG


def test_deterministic_by_seed_and_independent_query_sets():
    scores = {"baseline": _scores(np.random.default_rng(4)), "v": _scores(np.random.default_rng(5))}
    first = paired_bootstrap(scores, SETS, config=BootstrapConfig(resamples=300, seed=7))
    assert first == paired_bootstrap(scores, SETS, config=BootstrapConfig(resamples=300, seed=7))
    other = paired_bootstrap(scores, SETS, config=BootstrapConfig(resamples=300, seed=8))
    assert other["v"]["delta_i2i_map"] != first["v"]["delta_i2i_map"]
    # adding a metric on its own query set leaves the other sets' intervals untouched
    extra = {v: {**s, "knn_top1": np.ones(30)} for v, s in scores.items()}
    with_extra = paired_bootstrap(extra, SETS, config=BootstrapConfig(resamples=300, seed=7))
    assert with_extra["v"]["delta_t2i_r5"] == first["v"]["delta_t2i_r5"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="different query counts"):
        paired_bootstrap({"baseline": {"a": np.ones(3), "b": np.ones(4)}}, {"a": "s", "b": "s"})
    with pytest.raises(ValueError, match="resamples"):
        BootstrapConfig(resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapConfig(confidence=1.0)
