"""The asset checks' logic on crafted reports and index info (pass and fail at the boundaries)."""
import polars as pl
import pytest

from clipopt_core.layout import Keys
from clipopt_core.serve.shards import STAGING_FOLDER, index_key
from clipopt_dagster import checks
from clipopt_dagster.resources import ArtifactStoreResource

BASE = {"i2i_map": 0.30, "t2i_r5": 0.20, "zs_top1": 0.10}


def _store(tmp_path, served: dict, tolerance: float = 0.01, min_gain: float = 0.0) -> ArtifactStoreResource:
    resource = ArtifactStoreResource(base_url=f"file://{tmp_path}")
    resource.store().write_json(Keys.report_json, {"serve_variant": "mcip_realign", "alignment_tolerance": tolerance,
                                                   "min_i2i_gain": min_gain,
                                                   "metrics": {"baseline": BASE, "mcip_realign": served}})
    return resource


@pytest.mark.parametrize("served, passed", [
    ({"i2i_map": 0.4, "t2i_r5": 0.19, "zs_top1": 0.10}, True),     # T2I down by exactly the tolerance
    ({"i2i_map": 0.4, "t2i_r5": 0.18, "zs_top1": 0.12}, False),    # T2I down by more than the tolerance
    ({"i2i_map": 0.4, "t2i_r5": 0.25, "zs_top1": 0.08}, False),    # zero-shot down by more than the tolerance
])
def test_alignment_preserved(tmp_path, served, passed):
    result = checks.alignment_preserved(_store(tmp_path, served))
    assert result.passed is passed
    assert result.metadata["delta_t2i_r5"].value == pytest.approx(served["t2i_r5"] - BASE["t2i_r5"], abs=1e-4)


@pytest.mark.parametrize("i2i, min_gain, passed", [(0.31, 0.0, True), (0.30, 0.0, False), (0.25, 0.0, False),
                                                   (0.35, 0.05, False), (0.36, 0.05, True)])
def test_retrieval_improved(tmp_path, i2i, min_gain, passed):
    result = checks.retrieval_improved(_store(tmp_path, {**BASE, "i2i_map": i2i}, min_gain=min_gain))
    assert result.passed is passed


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
