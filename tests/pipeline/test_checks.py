"""The asset checks' logic on crafted reports and index info (pass and fail at the boundaries)."""
import polars as pl
import pytest

from clipopt_core.layout import Keys
from clipopt_core.serve.shards import STAGING_FOLDER, index_key
from clipopt_dagster import checks
from clipopt_dagster.resources import ArtifactStoreResource

BASE = {"i2i_map": 0.30, "t2i_r5": 0.20, "zs_top1": 0.10, "t2i_cls_r5": 0.5}


def _store(tmp_path, served: dict, tolerance: float = 0.01, min_gain: float = 0.0, intervals: dict | None = None,
           base: dict = BASE) -> ArtifactStoreResource:
    """A crafted report; ``intervals``: metric -> (lo, hi) of the served variant's delta (omitted: none stored)."""
    resource = ArtifactStoreResource(base_url=f"file://{tmp_path}")
    report = {"serve_variant": "mcip_realign", "alignment_tolerance": tolerance, "min_i2i_gain": min_gain,
              "metrics": {"baseline": base, "mcip_realign": served}}
    if intervals is not None:
        report["intervals"] = {"mcip_realign": {f"delta_{m}": list(b) for m, b in intervals.items()}}
    resource.store().write_json(Keys.report_json, report)
    return resource


@pytest.mark.parametrize("served, intervals, passed", [
    # a drop larger than the tolerance that is significant (upper bound < 0): blocks
    ({**BASE, "t2i_r5": 0.18}, {"t2i_r5": (-0.03, -0.005), "zs_top1": (-0.01, 0.01)}, False),
    # the same drop but the interval reaches 0 (noise): passes
    ({**BASE, "t2i_r5": 0.18}, {"t2i_r5": (-0.045, 0.004), "zs_top1": (-0.01, 0.01)}, True),
    # significant but within the tolerance: passes
    ({**BASE, "t2i_r5": 0.195}, {"t2i_r5": (-0.008, -0.002), "zs_top1": (-0.01, 0.01)}, True),
    # down by exactly the tolerance, significant: passes (the drop must exceed the tolerance)
    ({**BASE, "t2i_r5": 0.19}, {"t2i_r5": (-0.015, -0.005), "zs_top1": (-0.01, 0.01)}, True),
    # zero-shot significantly down by more than the tolerance: blocks even with T2I up
    ({**BASE, "t2i_r5": 0.25, "zs_top1": 0.08}, {"t2i_r5": (0.02, 0.08), "zs_top1": (-0.03, -0.01)}, False),
    # no intervals stored (an older report): the point rule
    ({**BASE, "t2i_r5": 0.18}, None, False),
    ({**BASE, "t2i_r5": 0.19}, None, True),
])
def test_alignment_preserved_decides_on_the_interval(tmp_path, served, intervals, passed):
    result = checks.alignment_preserved(_store(tmp_path, served, intervals=intervals))
    assert result.passed is passed
    assert result.metadata["delta_t2i_r5"].value == pytest.approx(served["t2i_r5"] - BASE["t2i_r5"], abs=1e-4)
    assert (result.metadata["blocked_by"].value == "none") is passed


def test_alignment_falls_back_to_class_captions_without_held_out_pairs(tmp_path):
    base = {**BASE, "t2i_r5": float("nan")}
    served = {**base, "t2i_cls_r5": 0.40}
    intervals = {"t2i_cls_r5": (-0.15, -0.05), "t2i_r5": (float("nan"), float("nan")), "zs_top1": (0.0, 0.0)}
    result = checks.alignment_preserved(_store(tmp_path, served, intervals=intervals, base=base))
    assert result.passed is False and result.metadata["blocked_by"].value == "t2i_cls_r5"
    assert "delta_t2i_r5" not in result.metadata


@pytest.mark.parametrize("i2i, interval, min_gain, passed", [
    (0.35, (0.02, 0.08), 0.0, True),       # lower bound above 0
    (0.35, (-0.01, 0.11), 0.0, False),     # a point gain the interval cannot confirm
    (0.30, (0.0, 0.0), 0.0, False),        # identical to the baseline (serving the baseline)
    (0.40, (0.04, 0.16), 0.05, False),     # lower bound below min_i2i_gain
    (0.40, (0.06, 0.14), 0.05, True),
    (0.31, None, 0.0, True),               # no intervals stored: the point rule
    (0.30, None, 0.0, False),
])
def test_retrieval_improved_decides_on_the_lower_bound(tmp_path, i2i, interval, min_gain, passed):
    intervals = None if interval is None else {"i2i_map": interval}
    result = checks.retrieval_improved(_store(tmp_path, {**BASE, "i2i_map": i2i}, min_gain=min_gain, intervals=intervals))
    assert result.passed is passed
    if interval is not None:
        assert result.metadata["delta_i2i_map_ci"].value == f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


@pytest.mark.parametrize("recall, passed", [(0.95, True), (0.949, False)])
def test_index_recall(tmp_path, recall, passed):
    """The check judges the staged candidate and reports what is served (an earlier index when refused)."""
    resource = ArtifactStoreResource(base_url=f"file://{tmp_path}")
    staged = index_key(Keys.serving, "info.json", STAGING_FOLDER)
    resource.store().write_json(staged, {"recall_at_10": recall, "target_recall": 0.95, "kind": "ivf_flat", "n": 9})
    resource.store().write_json(Keys.index_info, {"recall_at_10": 0.97, "target_recall": 0.95, "kind": "flat", "n": 5})
    result = checks.index_recall(resource)
    assert result.passed is passed and result.metadata["promoted"].value is passed
    assert result.metadata["served_n"].value == 5


@pytest.mark.parametrize("labels, rejected, passed", [
    (["a", "a", "b", "b"], 0, True),
    (["a", "a", "b", "c"], 0, False),      # one class with two images only
    (["a", "a", "b", "b"], 4, False),      # half the rows rejected
])
def test_manifest_valid(tmp_path, labels, rejected, passed):
    resource = ArtifactStoreResource(base_url=f"file://{tmp_path}")
    store = resource.store()
    store.write_parquet(Keys.manifest, pl.DataFrame({"label": labels}))
    store.write_parquet(Keys.rejected, pl.DataFrame({"path": [f"x{i}" for i in range(rejected)]},
                                                    schema={"path": pl.String}))
    assert checks.manifest_valid(resource).passed is passed
