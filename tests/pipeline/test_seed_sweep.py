"""The seed sweep on the real graph: N seeds of every stage, one mean ± sd report, served models untouched."""
import dagster as dg
import polars as pl
import pytest

from clipopt_core.evaluate.seeds import seed_root
from clipopt_core.registry import STAGES, VARIANTS
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.assets_data import base_model, caption_corpus, image_manifest, image_splits, pseudo_captions, raw_images
from clipopt_dagster.assets_sweep import seed_sweep
from tests.pipeline.conftest import TINY_TRAIN, tiny_resources, tiny_run_config

pytestmark = pytest.mark.slow  # trains every stage twice (about 40 s on 2 cores)
UPSTREAM = [raw_images, image_manifest, image_splits, caption_corpus, base_model, pseudo_captions]


def test_seed_sweep_trains_each_seed_and_reports_mean_and_sd(tmp_path, shapes_source, caption_source) -> None:
    resources = tiny_resources(tmp_path, shapes_source, caption_source)
    ops = tiny_run_config()["ops"]
    upstream_config = {"ops": {a.key.path[-1]: ops[a.key.path[-1]] for a in UPSTREAM if a.key.path[-1] in ops}}
    assert dg.materialize(UPSTREAM, resources=resources, run_config=upstream_config).success
    sweep_config = {"seeds": [0, 1], "templates": "short",
                    **{s.asset: {**TINY_TRAIN, **({"batch_size": 16} if s.kind == "realign" else {})} for s in STAGES}}
    result = dg.materialize([seed_sweep], resources=resources, run_config={"ops": {"seed_sweep": {"config": sweep_config}}})
    assert result.success
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    summary = store.read_parquet("reports/seeds.parquet")
    assert summary["variant"].unique(maintain_order=True).to_list() == list(VARIANTS)
    trained = summary.filter(pl.col("variant") != "baseline")
    assert (trained["seeds"] == 2).all() and trained["values"].list.len().eq(2).all()
    assert (trained["sd"] > 0).any()  # the seed changes the weights, hence some metric
    for seed in (0, 1):
        for stage in STAGES:
            assert store.exists(f"{seed_root(seed)}/{stage.asset}/_COMPLETE.json")
    assert not store.exists("models/retrieval_encoder")  # the served models are not the sweep's
    assert "± " in store.read_bytes("reports/seeds.md").decode()
    again = dg.materialize([seed_sweep], resources=resources, run_config={"ops": {"seed_sweep": {"config": sweep_config}}})
    runs = again.asset_materializations_for_node("seed_sweep")[0].metadata["runs"].value
    assert "| False |" not in runs  # unchanged inputs: every seed's every stage reused
