"""Table 1's paired-bootstrap intervals: per-query scores of every protocol, their storage, and the intervals
of each variant's difference to the baseline on hand-checkable cases (docs/method.md#benchmark-suite)."""
from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from clipopt_core.cli import main as cli
from clipopt_core.evaluate.bootstrap import BootstrapConfig, paired_bootstrap
from clipopt_core.suite import protocols
from clipopt_core.suite.columns import get_column
from clipopt_core.suite.intervals import table_intervals
from clipopt_core.suite.run import (ColumnResult, attach_scores, evaluate_column, merge_variants, query_digest,
                                   scores_frame, table_values)
from clipopt_core.suite.table import build_table1
from clipopt_core.suite.types import CaptionSet, ImageSet, RevisitedSet
from tests.benchmark_suite_data import fake_loaders, write_caption_set, write_image_set
from tests.unit.test_benchmark_suite_protocols import QUERY, RANKED_DB, TableEmbedder

BASE_AP = np.array([0.2, 0.5, 0.9, 0.4, 0.7, 0.3, 0.6, 0.8])


def result(column: str, scores: dict[str, np.ndarray], queries: str = "") -> ColumnResult:
    """A result of ``column`` whose headline metric has ``scores`` ``{variant: [Q]}`` (values: their means)."""
    metric = get_column(column).metric
    per_query = {v: {metric: np.asarray(s, dtype=np.float64)} for v, s in scores.items()}
    return ColumnResult(column, {v: protocols.point_values(p) for v, p in per_query.items()},
                        queries=queries or column, per_query=per_query)


# ---------------------------------------------------------------- intervals by hand


def test_a_variant_better_on_every_query_gets_an_interval_above_zero():
    """Every query gains 5–20 AP points: each resampled mean gain lies in [5, 20], so the interval does too."""
    gains = np.array([0.05, 0.10, 0.20, 0.05, 0.15, 0.10, 0.05, 0.20])
    results = [result("i2i_instre", {"baseline": BASE_AP, "mcip": BASE_AP + gains})]
    lo, hi = table_intervals(results)["mcip"]["delta_i2i_instre"]
    assert 0.05 <= lo < gains.mean() < hi <= 0.20
    table = build_table1(table_values(results), intervals=table_intervals(results))
    change = table.rows[2]
    assert (change["variant"], change["source"]) == ("mcip", "change")
    assert change["i2i_instre"] == pytest.approx(100 * gains.mean())
    assert change["i2i_instre_lo"] == pytest.approx(100 * lo)
    md = table.markdown()
    assert f"| mcip · vs baseline | +{100 * gains.mean():.1f} [+{100 * lo:.1f}, +{100 * hi:.1f}]* |" in md
    # a variant worse on every query: the interval lies below 0
    worse = [result("i2i_instre", {"baseline": BASE_AP, "stage1": BASE_AP - gains})]
    lo, hi = table_intervals(worse)["stage1"]["delta_i2i_instre"]
    assert -0.20 <= lo < hi < 0
    assert "]* |" in build_table1(table_values(worse), intervals=table_intervals(worse)).markdown()


def test_identical_variants_get_zero_intervals_everywhere():
    results = [result("i2i_instre", {"baseline": BASE_AP, "same": BASE_AP.copy()}),
               result("knn_aircraft", {"baseline": [1, 0, 1, 1], "same": [1, 0, 1, 1]}),
               result("t2i_coco", {"baseline": [0, 1, 1, 0, 1], "same": [0, 1, 1, 0, 1]})]
    intervals = table_intervals(results)["same"]
    assert set(intervals) == {"delta_i2i_instre", "delta_knn_aircraft", "delta_t2i_coco", "delta_i2i_mean",
                              "delta_knn_mean", "delta_t2i_mean", "delta_avg"}
    assert all(bounds == (0.0, 0.0) for bounds in intervals.values())
    md = build_table1(table_values(results), intervals=table_intervals(results)).markdown()
    change = next(line for line in md.splitlines() if line.startswith("| same · vs baseline |"))
    assert change.startswith("| same · vs baseline | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |") and "*" not in change


def test_columns_on_the_same_queries_share_the_resamples():
    """kNN and zero-shot on ImageNet val: the variant gains d_i on kNN where it loses d_i on zero-shot. Drawn
    with the same indices (same query digest) the AVG difference is 0 in every resample; drawn independently
    (other queries) it is not."""
    rng = np.random.default_rng(0)
    knn, zs = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    d = rng.integers(0, 2, 200) * 0.5

    def columns(zs_queries: str) -> list[ColumnResult]:
        return [result("knn_imagenet", {"baseline": knn, "v": knn + d}, queries="imagenet-val"),
                result("zs_imagenet", {"baseline": zs, "v": zs - d}, queries=zs_queries)]

    paired = table_intervals(columns("imagenet-val"))["v"]
    assert paired["delta_avg"] == pytest.approx((0.0, 0.0)) and paired["delta_knn_imagenet"][0] > 0
    independent = table_intervals(columns("other"))["v"]
    assert independent["delta_avg"][0] < -0.01 and independent["delta_avg"][1] > 0.01
    assert independent["delta_knn_imagenet"] == paired["delta_knn_imagenet"]  # a set's draws depend on its name only


def test_intervals_are_the_evaluation_reports_bootstrap_and_follow_its_settings():
    scores = {"baseline": BASE_AP, "mcip": BASE_AP[::-1].copy()}
    results = [result("i2i_cub200", scores, queries="cub")]
    direct = paired_bootstrap({v: {"i2i_cub200": s} for v, s in scores.items()}, {"i2i_cub200": "cub"})
    assert table_intervals(results)["mcip"]["delta_i2i_cub200"] == direct["mcip"]["delta_i2i_cub200"]
    assert table_intervals(results, config=BootstrapConfig(seed=1))["mcip"] != table_intervals(results)["mcip"]
    # more variants, or a column evaluated for some variants only, leave each variant's intervals as they are
    more = [result("i2i_cub200", {**scores, "stage1": BASE_AP * 0.5}, queries="cub"),
            result("t2i_coco", {"baseline": [0, 1, 1, 0], "stage1": [1, 1, 1, 0]})]
    intervals = table_intervals(more)
    assert intervals["mcip"] == table_intervals(results)["mcip"]
    assert intervals["stage1"]["delta_t2i_coco"] == table_intervals(more[1:])["stage1"]["delta_t2i_coco"]
    assert "delta_t2i_mean" not in intervals["mcip"] and "delta_avg" in intervals["stage1"]


def test_a_column_without_scores_has_no_interval_nor_do_the_means_covering_it():
    scored = result("i2i_gpr1200", {"baseline": BASE_AP, "mcip": BASE_AP + 0.1})
    bare = ColumnResult("i2i_instre", {"baseline": {"map": 0.5}, "mcip": {"map": 0.6}})
    other = result("t2i_coco", {"baseline": [0, 1, 1, 0], "mcip": [1, 1, 1, 0]})
    intervals = table_intervals([scored, bare, other])["mcip"]
    assert set(intervals) == {"delta_i2i_gpr1200", "delta_t2i_coco", "delta_t2i_mean"}
    row = build_table1(table_values([scored, bare, other]), intervals={"mcip": intervals}).rows[2]
    assert row["i2i_instre"] == pytest.approx(10.0) and math.isnan(row["i2i_instre_lo"])
    assert row["i2i_mean"] == pytest.approx(10.0) and math.isnan(row["i2i_mean_lo"]) and math.isnan(row["avg_lo"])
    assert row["i2i_gpr1200_lo"] == pytest.approx(10.0)


# ---------------------------------------------------------------- per-query scores of every protocol


def test_per_query_scores_of_every_protocol_average_to_the_column_value(monkeypatch):
    """One hand-made case per protocol: the per-query scores are the hand values and average to the column."""
    vectors = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.6, 0.8]), "c": torch.tensor([0.8, 0.6])}
    images = ImageSet("gpr", ("a", "b", "c"), np.array([0, 0, 1]), ("x", "y"))
    rox = RevisitedSet("rox", tuple(f"d{i}" for i in range(6)), ("q0",), np.zeros((1, 4)),
                       (np.array([0, 3]),), (np.array([2, 5]),), (np.array([1]),))
    database = ImageSet("train", ("t0", "t1"), np.array([0, 1]), ("x", "y"))
    eye = torch.eye(2)
    captions = CaptionSet("coco", ("a", "b"), ("to a", "to a too", "to b"), np.array([0, 0, 1]))
    embedder = TableEmbedder({**vectors, **{f"d{i}": RANKED_DB[i] for i in range(6)}, "q0": QUERY[0],
                              "t0": eye[0], "t1": eye[1]},
                             texts={"to a": eye[0], "to a too": eye[1], "to b": eye[1]},
                             classes={"x": eye[0], "y": eye[1]})
    sets = {"load_gpr1200": images, "load_revisited": rox, "load_aircraft": {"trainval": database, "test": images},
            "load_imagenet": {"val": images}, "load_karpathy": captions}
    monkeypatch.setattr("clipopt_core.suite.columns.loader", lambda name: lambda root, *args: (
        sets[name][args[-1]] if isinstance(sets[name], dict) else sets[name]))
    expected = {  # column -> the headline metric's per-query scores, by hand
        "i2i_gpr1200": [(1 + 2 / 3) / 2, (1 + 2 / 3) / 2, 1.0],  # the query counted as a hit
        "i2i_roxford5k": [(3 + (0.75 + 0.8) / 2) / 4],  # medium, junk removed
        "knn_aircraft": [1.0, 0.0, 0.0],  # nearest train image: t0 (label 0) for a; b nearer t1 (label 1); c nearer t0
        "zs_imagenet": [1.0, 0.0, 0.0],  # the same ranking against the class embeddings x, y
        "t2i_coco": [1.0, 1.0, 1.0],  # R@5 over 2 images: the top 5 hold both
    }
    roots = {key: "/r" for key in ("gpr1200", "roxford5k", "aircraft", "imagenet", "coco")}
    for column, scores in expected.items():
        outcome = evaluate_column(get_column(column), roots, {"v": lambda: embedder})
        metric = get_column(column).metric
        np.testing.assert_allclose(outcome.per_query["v"][metric], scores)
        assert outcome.metrics["v"] == protocols.point_values(outcome.per_query["v"])
        assert outcome.headline("v") == pytest.approx(np.mean(scores))
    t2i = evaluate_column(get_column("t2i_coco"), roots, {"v": lambda: embedder}).per_query["v"]
    np.testing.assert_allclose(t2i["r1"], [1.0, 0.0, 1.0])  # "to a too" sits on image b's axis
    rox_scores = evaluate_column(get_column("i2i_roxford5k"), roots, {"v": lambda: embedder}).per_query["v"]
    assert set(rox_scores) == {"easy", "medium", "hard"} and rox_scores["easy"][0] == pytest.approx(1.0)


def test_queries_digest_names_the_queries_not_the_database():
    a = ImageSet("val", ("x", "y"), np.array([0, 1]), ("p", "q"))
    assert query_digest((ImageSet("train", ("t",), np.array([0]), ("p", "q")), a)) == query_digest(a)
    assert query_digest(a) != query_digest(ImageSet("val", ("y", "x"), np.array([1, 0]), ("p", "q")))


# ---------------------------------------------------------------- storage round trips


def test_scores_frame_round_trip_and_a_mismatch_is_refused(tmp_path):
    ours = result("i2i_instre", {"baseline": np.r_[BASE_AP, np.nan], "mcip": np.r_[BASE_AP + 0.1, 0.3]})
    skipped = ColumnResult("t2i_coco", skipped="set roots.coco")
    scores_frame([ours, skipped]).write_parquet(tmp_path / "s.parquet")
    loaded = attach_scores([ColumnResult.from_json(json.loads(json.dumps(r.to_json()))) for r in (ours, skipped)],
                           pl.read_parquet(tmp_path / "s.parquet"))
    np.testing.assert_array_equal(loaded[0].per_query["baseline"]["map"], ours.per_query["baseline"]["map"])
    assert loaded[0].queries == "i2i_instre" and loaded[1].skipped == "set roots.coco"
    assert table_intervals(loaded) == table_intervals([ours])
    changed = pl.read_parquet(tmp_path / "s.parquet").with_columns(
        pl.when(pl.col("query") == 0).then(pl.col("score") + 0.5).otherwise(pl.col("score")).alias("score"))
    with pytest.raises(ValueError, match="i2i_instre: the per-query scores of baseline do not average"):
        attach_scores([ColumnResult.from_json(ours.to_json())], changed)
    with pytest.raises(ValueError, match="i2i_instre: no per-query scores of mcip"):
        attach_scores([ColumnResult.from_json(ours.to_json())], changed.filter(pl.col("variant") == "baseline"))


@pytest.fixture
def roots(tmp_path, monkeypatch):
    images, captions = write_image_set(tmp_path / "gpr"), write_caption_set(tmp_path / "f30k")
    fake_loaders(monkeypatch, {"load_gpr1200": images, "load_karpathy": captions})
    (tmp_path / "roots.yaml").write_text("gpr1200: gpr\nflickr30k: f30k\n")
    return tmp_path


def run_cli(tmp, *extra) -> int:
    return cli.main(["benchmark-suite", "--model", "clipopt-tiny", "--roots", str(tmp / "roots.yaml"),
                     "--cache", str(tmp / "cache"), "--batch-size", "8", "--columns", "i2i_gpr1200", "t2i_flickr30k",
                     *extra])


def test_benchmark_suite_cli_keeps_the_scores_and_compares_against_an_earlier_report(roots, capsys):
    """The base model's report, then the same weights as another variant against it: every difference and
    every interval is exactly 0."""
    assert run_cli(roots, "--out", str(roots / "base.json")) == 0
    report = json.loads((roots / "base.json").read_text())
    frame = pl.read_parquet(roots / "base.scores.parquet")
    stored = attach_scores([ColumnResult.from_json(c) for c in report["columns"]], frame)
    assert {r.column: len(r.per_query["baseline"][get_column(r.column).metric]) for r in stored} == \
        {"i2i_gpr1200": 12, "t2i_flickr30k": 30}  # 12 images; 6 images × 5 captions
    capsys.readouterr()
    assert run_cli(roots, "--variant", "mcip", "--against", str(roots / "base.json"), "--out", str(roots / "c.md")) == 0
    md = (roots / "c.md").read_text()
    assert "| baseline |" in md and "| mcip · vs baseline | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in md
    assert run_cli(roots, "--against", str(roots / "base.json")) == 2
    assert "name ours with --variant" in capsys.readouterr().err
    (roots / "base.scores.parquet").unlink()
    assert run_cli(roots, "--variant", "mcip", "--against", str(roots / "base.json")) == 2
    assert "base.scores.parquet are missing" in capsys.readouterr().err


def test_merging_two_evaluations_needs_the_same_queries():
    base = result("i2i_instre", {"baseline": BASE_AP}, queries="q1")
    ours = result("i2i_instre", {"mcip": BASE_AP + 0.1}, queries="q1")
    merged = merge_variants(base, ours)
    assert list(merged.metrics) == ["baseline", "mcip"] and set(merged.per_query) == {"baseline", "mcip"}
    assert table_intervals([merged])["mcip"]["delta_i2i_instre"] == pytest.approx((0.1, 0.1))
    with pytest.raises(ValueError, match="i2i_instre: the two evaluations measured different queries"):
        merge_variants(base, result("i2i_instre", {"mcip": BASE_AP}, queries="q2"))
    skipped = ColumnResult("i2i_instre", skipped="set roots.instre")
    assert merge_variants(base, skipped) is skipped
