"""``benchmark_suite`` partitions and ``table1_report`` on tiny benchmark sets with the tiny model."""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch

from clipopt_core.layout import Keys
from clipopt_core.models.loading import ModelSpec, export_checkpoint, load_model
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.suite import paper, protocols
from clipopt_core.suite.embedding import SuiteEmbedder
from clipopt_dagster.assets_data import base_model
from clipopt_core.suite.run import ColumnResult, attach_scores
from clipopt_dagster.assets_suite import benchmark_suite, result_key, scores_key, table1_report
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource
from tests.benchmark_suite_data import fake_loaders, write_caption_set, write_image_set

VARIANTS = ["baseline", "stage1"]


def publish_stage1(tmp: Path, store: ArtifactStore, seed: int) -> None:
    """Publish a perturbed tiny model as the stage-1 checkpoint (what ``retrieval_encoder`` would write)."""
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp / "cache")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in bundle.model.named_parameters():
            if name.startswith("visual."):
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    folder = export_checkpoint(bundle, tmp / f"stage1-{seed}", {"stage": "retrieval_encoder"})
    store.put_dir(folder, Keys.model("retrieval_encoder"))


def resources(tmp: Path) -> dict:
    return {"store": ArtifactStoreResource(base_url=f"file://{tmp / 'artifacts'}"),
            "compute": ComputeResource(cache_dir=str(tmp / "cache"), torch_threads=1)}


def suite_config(**config) -> dict:
    return {"ops": {"benchmark_suite": {"config": {"variants": VARIANTS, "batch_size": 8, "templates": "short",
                                                   **config}}}}


@pytest.fixture
def suite_store(tmp_path, monkeypatch):
    images, captions = write_image_set(tmp_path / "gpr"), write_caption_set(tmp_path / "f30k")
    calls = fake_loaders(monkeypatch, {"load_gpr1200": images, "load_karpathy": captions})
    assert dg.materialize([base_model], resources=resources(tmp_path),
                          run_config={"ops": {"base_model": {"config": {"name": "clipopt-tiny"}}}}).success
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    publish_stage1(tmp_path, store, seed=0)
    return tmp_path, store, images, calls


def materialise_column(tmp: Path, column: str, raise_on_error: bool = True, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize([benchmark_suite], partition_key=column, resources=resources(tmp),
                          run_config=suite_config(**config), raise_on_error=raise_on_error)


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    event = result.asset_materializations_for_node(asset)[0]
    return {key: getattr(value, "value", value) for key, value in event.metadata.items()}


def test_partitions_evaluate_every_variant_skip_missing_roots_and_render_table1(suite_store, monkeypatch):
    tmp, store, images, calls = suite_store
    (tmp / "roots.yaml").write_text("gpr1200: gpr\n")  # relative to the roots file
    monkeypatch.setenv("CLIPOPT_SUITE_ROOTS", str(tmp / "roots.yaml"))
    materialise_column(tmp, "i2i_gpr1200")
    materialise_column(tmp, "t2i_flickr30k", roots={"flickr30k": str(tmp / "f30k")})
    skipped = materialise_column(tmp, "zs_objectnet")
    assert calls == [("load_gpr1200", (str(tmp / "gpr"),)), ("load_karpathy", (str(tmp / "f30k"), "flickr30k", "test"))]

    gpr = store.read_json(result_key("i2i_gpr1200"))
    assert set(gpr["metrics"]) == set(VARIANTS) and gpr["skipped"] is None
    # the asset's baseline value is the protocol on the base model; stage 1's weights give another value
    base = SuiteEmbedder(load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp / "cache"))
    assert gpr["metrics"]["baseline"]["map"] == pytest.approx(protocols.point_values(protocols.evaluate_i2i(base, images))["map"], abs=1e-6)
    assert gpr["metrics"]["stage1"]["map"] != pytest.approx(gpr["metrics"]["baseline"]["map"], abs=1e-6)
    f30k = store.read_json(result_key("t2i_flickr30k"))
    assert set(f30k["metrics"]["baseline"]) == {"r1", "r5", "r10"} and f30k["metrics"]["baseline"]["r10"] == 1.0
    assert metadata(skipped, "benchmark_suite")["skipped"].startswith("skipped: set roots.objectnet to the ObjectNet")
    assert not list((tmp / "cache" / "suite-embeddings").glob("*.tmp-*")) and \
        len(list((tmp / "cache" / "suite-embeddings").glob("*.npy"))) >= 4  # persisted for the next runs

    # the per-query scores beside each column's JSON average to its values, for every variant
    stored = attach_scores([ColumnResult.from_json(gpr)], store.read_parquet(scores_key("i2i_gpr1200")))[0]
    assert set(stored.per_query) == set(VARIANTS) and len(stored.per_query["stage1"]["map"]) == len(images.uris)
    assert not store.exists(scores_key("zs_objectnet"))

    report = dg.materialize([table1_report], resources={"store": resources(tmp)["store"]})
    md = metadata(report, "table1_report")["table1"]
    assert "I2I GPR1200" in md and "T2I Flickr30k" in md and "AVG (2/14)" in md and "| stage1 |" in md
    change = next(line for line in md.splitlines() if line.startswith("| stage1 · vs baseline |"))
    delta = 100 * (gpr["metrics"]["stage1"]["map"] - gpr["metrics"]["baseline"]["map"])
    assert change.startswith(f"| stage1 · vs baseline | {delta:+.1f} [") and "Without intervals" not in md
    assert store.read_json("reports/table1.json")["bootstrap"]["resamples"] == 1000
    assert "zs_objectnet: set roots.objectnet" in md and "knn_imagenet: not materialised yet" in md
    assert "· paper" not in md  # clipopt-tiny is not a model of the paper
    assert store.read_json("reports/table1.json")["columns"] == ["i2i_gpr1200", "t2i_flickr30k"]

    # the same results beside the paper's figures when the base model is one the paper used
    monkeypatch.setitem(paper.BASE_MODELS, ("clipopt-tiny", ""), "OpenAI ViT-L/14@336")
    md = metadata(dg.materialize([table1_report], resources={"store": resources(tmp)["store"]}), "table1_report")["table1"]
    assert "| baseline · paper | 76.0 | 89.0 |" in md and "| stage1 · Δ |" in md

    # scores that no longer average to the stored values: the values stay, without intervals
    scores = store.read_parquet(scores_key("t2i_flickr30k"))
    store.write_parquet(scores_key("t2i_flickr30k"), scores.with_columns((1.0 - pl.col("score")).alias("score")))
    md = metadata(dg.materialize([table1_report], resources={"store": resources(tmp)["store"]}), "table1_report")["table1"]
    assert "Without intervals:\n- t2i_flickr30k: the per-query scores of baseline do not average" in md
    assert "T2I Flickr30k" in md and f"| stage1 · vs baseline | {delta:+.1f} [" in md
    store.write_parquet(scores_key("t2i_flickr30k"), scores)

    # new stage-1 weights: its columns are stale until re-materialised
    publish_stage1(tmp, store, seed=1)
    md = metadata(dg.materialize([table1_report], resources={"store": resources(tmp)["store"]}), "table1_report")["table1"]
    assert "i2i_gpr1200: stale" in md and "I2I GPR1200" not in md


def test_a_root_without_the_layout_fails_its_partition(suite_store):
    tmp, _, _, _ = suite_store
    result = materialise_column(tmp, "i2i_gpr1200", raise_on_error=False, roots={"gpr1200": str(tmp / "nowhere")})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "nowhere is not a folder" in str(failure.event_specific_data.error)


def test_unknown_root_key_or_variant_is_a_clear_error(suite_store):
    tmp, _, _, _ = suite_store
    for config, message in (({"roots": {"imagenet1k": "x"}}, "unknown benchmark root"),
                            ({"variants": ["baseline", "stage9"]}, "unknown variant(s) stage9")):
        result = materialise_column(tmp, "i2i_gpr1200", raise_on_error=False, **config)
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert message in str(failure.event_specific_data.error)
