"""Input-addressed training: a changed input retrains its stages, unchanged inputs reuse them.

The training assets run on tiny data through the real graph, then again after one input changes:
the mining threshold, one image's bytes (the image count unchanged), the split seed, a caption of
the caption corpus. Each stage must retrain exactly when something it reads changed, and an
unchanged stage must reuse its published checkpoint (same weights hash, no training step).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clipopt_core.registry import STAGES
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.assets_data import base_model, caption_corpus, image_manifest, image_splits, pseudo_captions, raw_images
from clipopt_dagster.assets_training import TRAINING_ASSETS
from tests.conftest import draw_shape
from tests.pipeline.conftest import tiny_resources, tiny_run_config

pytestmark = pytest.mark.slow  # five graph runs that train (about a minute on 2 cores)
GRAPH = [raw_images, image_manifest, image_splits, caption_corpus, base_model, pseudo_captions, *TRAINING_ASSETS]
ASSETS = [stage.asset for stage in STAGES]


def run_config(**ops: dict) -> dict:
    """The tiny run config of the training graph (no evaluation or serving assets)."""
    names = {asset.key.path[-1] for asset in GRAPH}
    return {"ops": {name: op for name, op in tiny_run_config(**ops)["ops"].items() if name in names}}


def materialise(tmp: Path, images: Path, captions: Path, **ops: dict) -> dict[str, dict]:
    """Run the graph; returns each training asset's metadata (``reused``, ``identity``, ``weights_sha256``)."""
    result = dg.materialize(GRAPH, resources=tiny_resources(tmp, images, captions), run_config=run_config(**ops))
    assert result.success
    return {asset: {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}
            for asset in ASSETS}


def retrained(before: dict[str, dict], after: dict[str, dict]) -> set[str]:
    changed = {asset for asset in ASSETS if after[asset]["identity"] != before[asset]["identity"]}
    assert changed == {asset for asset in ASSETS if not after[asset]["reused"]}  # new identity ⇔ trained
    return changed


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, shapes_source: Path, caption_source: Path) -> tuple[Path, Path]:
    """Private copies of the sources: the tests edit them."""
    root = tmp_path_factory.mktemp("identity")
    shutil.copytree(shapes_source, root / "images")
    shutil.copytree(caption_source, root / "captions")
    return root / "images", root / "captions"


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, sources: tuple[Path, Path]) -> tuple[Path, dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("store")
    return tmp, materialise(tmp, *sources)


def test_same_inputs_reuse_every_stage_with_the_same_weights(first, sources) -> None:
    tmp, before = first
    after = materialise(tmp, *sources)
    assert retrained(before, after) == set()
    assert all(after[a]["weights_sha256"] == before[a]["weights_sha256"] for a in ASSETS)


def test_mining_threshold_retrains_mcip_and_its_realignment_only(first, sources) -> None:
    tmp, before = first
    after = materialise(tmp, *sources, pseudo_captions={"config": {"top_k": 2, "threshold": None,
                                                                   "threshold_quantile": 0.6}})
    assert retrained(before, after) == {"mcip_encoder", "realigned_mcip"}


def test_no_pseudo_caption_fails_mcip_naming_the_setting_and_keeps_its_checkpoint(first, sources) -> None:
    tmp, before = first
    store = ArtifactStore(f"file://{tmp / 'artifacts'}")
    published = store.read_json("models/mcip_encoder/_COMPLETE.json")
    result = dg.materialize(GRAPH, resources=tiny_resources(tmp, *sources), raise_on_error=False,
                            run_config=run_config(pseudo_captions={"config": {"threshold": 0.999}}))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "mcip_encoder")
    assert "lower pseudo_captions' threshold" in str(failure.event_specific_data.error)
    assert store.read_json("models/mcip_encoder/_COMPLETE.json") == published  # nothing republished


def test_pseudo_captions_mine_with_the_configured_mining_model(first, sources) -> None:
    tmp, _ = first
    result = dg.materialize(GRAPH, resources=tiny_resources(tmp, *sources), raise_on_error=False,
                            run_config=run_config(pseudo_captions={"config": {"model_name": "ViT-B-23"}}))
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "pseudo_captions")
    assert "unknown model name 'ViT-B-23'" in str(failure.event_specific_data.error)  # not the base model (clipopt-tiny)


def test_one_image_replaced_with_the_count_unchanged_retrains_every_stage(first, sources) -> None:
    tmp, before = first
    images, captions = sources
    manifest = pl.read_csv(images / "manifest.csv")
    victim = images / manifest["path"][0]
    draw_shape("cross", (10, 10, 10), seed=424242).save(victim)  # other bytes, same path, same row count
    after = materialise(tmp, images, captions)
    assert retrained(before, after) == set(ASSETS)


def test_split_seed_retrains_every_stage(first, sources) -> None:
    tmp, _ = first
    before = materialise(tmp, *sources)  # the current sources (an earlier test may have edited them)
    after = materialise(tmp, *sources, image_splits={"config": {"val_fraction": 0.25, "test_fraction": 0.3, "seed": 7}})
    assert retrained(before, after) == set(ASSETS)


def test_edited_caption_corpus_retrains_the_realignments(first, sources) -> None:
    tmp, _ = first
    images, captions = sources
    before = materialise(tmp, images, captions)
    pairs = ArtifactStore(f"file://{tmp / 'artifacts'}").read_parquet("data/caption_pairs.parquet")
    trained_on = Path(pairs.filter(pl.col("split") == "train")["uri"][0]).name  # a held-out caption would not count
    manifest = pl.read_csv(captions / "manifest.csv")
    manifest.with_columns(pl.when(pl.col("path") == trained_on).then(pl.lit("an entirely new caption"))
                          .otherwise(pl.col("caption")).alias("caption")).write_csv(captions / "manifest.csv")
    after = materialise(tmp, images, captions)
    assert {"realigned_2sft", "realigned_mcip"} <= retrained(before, after)
    assert "retrieval_encoder" not in retrained(before, after)
    assert not list(tmp.glob("**/inputs-*"))  # the realignments' streamed corpus lives only as long as their run
