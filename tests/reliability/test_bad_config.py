"""Bad configuration is refused before any work, with an error that names what to fix.

Model-loading errors are unit-tested in tests/unit/test_models.py (close matches, unknown tag,
offline tag, hf-hub); here they are checked through the ``base_model`` asset, plus the
embedding-dimension mismatch of a checkpoint folder and out-of-range run config.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import pydantic
import pytest

from clipopt_core.models.loading import ModelSpec, export_checkpoint, load_model
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.configs import McipSettings, RealignSettings, RetrievalSettings
from tests.reliability.conftest import assets_named, failure_text, materialize
from tests.pipeline.conftest import tiny_resources


def _base_model(tmp_path: Path, **config: object) -> tuple[dg.ExecuteInProcessResult, float]:
    started = time.monotonic()
    result = materialize(("base_model",), tmp_path, tmp_path, ops={"base_model": {"config": config}})
    return result, time.monotonic() - started


def _nothing_published(tmp_path: Path) -> bool:
    root = tmp_path / "artifacts"
    return not root.exists() or not [p for p in root.rglob("*") if p.is_file()]


def test_unknown_model_name_lists_close_matches(tmp_path: Path):
    result, _ = _base_model(tmp_path, name="ViT-B-23", pretrained="openai")
    assert not result.success
    text = failure_text(result)
    assert "unknown model name 'ViT-B-23'" in text and "Close matches:" in text and "ViT-B-32" in text
    assert _nothing_published(tmp_path)


def test_uncached_pretrained_tag_fails_fast_and_says_how_to_provide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPOPT_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    result, elapsed = _base_model(tmp_path, name="ViT-B-32", pretrained="openai")
    assert not result.success
    assert elapsed < 5, f"took {elapsed:.1f}s to fail"
    text = failure_text(result)
    assert "ViT-B-32/openai" in text and "not in the local cache" in text
    assert "pretrained='/path/to/open_clip_model.safetensors'" in text and "CLIPOPT_ALLOW_DOWNLOAD=1" in text
    assert _nothing_published(tmp_path)


def test_checkpoint_with_mismatched_embed_dim_is_refused(tmp_path: Path):
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path / "cache")
    folder = export_checkpoint(bundle, tmp_path / "ckpt", {"stage": "test"})
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = 48  # weights are 32-dim
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    result, elapsed = _base_model(tmp_path, name=f"local-dir:{folder}")
    assert not result.success and elapsed < 5
    text = failure_text(result)
    assert "embedding dimension mismatch" in text
    assert "holds embed_dim 32" in text and "says embed_dim 48" in text and "open_clip_config.json" in text
    assert _nothing_published(tmp_path)


# (asset, config, field the error must name); each asset is materialised alone: the config is
# checked when its step starts, before the step reads or writes anything.
OUT_OF_RANGE = [
    ("image_splits", {"val_fraction": 1.5}, "val_fraction"),
    ("image_splits", {"test_fraction": -0.1}, "test_fraction"),
    ("image_splits", {"val_fraction": 0.6, "test_fraction": 0.6}, "val_fraction + test_fraction"),
    ("evaluation_report", {"alignment_tolerance": 5.0}, "alignment_tolerance"),
    ("evaluation_report", {"min_i2i_gain": -3.0}, "min_i2i_gain"),
    ("pseudo_captions", {"threshold_quantile": 1.0}, "threshold_quantile"),
    ("faiss_index", {"target_recall": 0.0}, "target_recall"),
]
# Training assets carry a RetryPolicy (2 retries, 5 s apart) that Dagster also applies to config
# errors: one asset-level case shows it, the other training fields are checked on the classes.
RETRIED = ("retrieval_encoder", {"lr": -1e-3}, "lr")


@pytest.mark.parametrize("asset,config,field", OUT_OF_RANGE, ids=[f"{a}.{f}" for a, _, f in OUT_OF_RANGE])
def test_out_of_range_config_names_the_field(tmp_path: Path, asset: str, config: dict, field: str):
    started = time.monotonic()
    result = dg.materialize(assets_named(asset), resources=tiny_resources(tmp_path, tmp_path, None),
                            run_config={"ops": {asset: {"config": config}}}, raise_on_error=False)
    elapsed = time.monotonic() - started
    assert not result.success
    text = failure_text(result)
    assert "ValidationError" in text and field in text, text
    assert elapsed < 10
    assert _nothing_published(tmp_path)
    assert not (tmp_path / "cache" / "work").exists()  # no training folder was even created


def test_out_of_range_training_config_fails_every_attempt_before_training(tmp_path: Path):
    asset, config, field = RETRIED
    started = time.monotonic()
    result = dg.materialize(assets_named(asset), resources=tiny_resources(tmp_path, tmp_path, None),
                            run_config={"ops": {asset: {"config": config}}}, raise_on_error=False)
    elapsed = time.monotonic() - started
    assert not result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 2 and elapsed < 20  # bounded: 3 attempts, 5 s apart
    assert "ValidationError" in failure_text(result) and field in failure_text(result)
    assert _nothing_published(tmp_path) and not (tmp_path / "cache" / "work").exists()


@pytest.mark.parametrize("settings,config,field", [
    (RetrievalSettings, {"batch_size": 1}, "batch_size"),
    (RetrievalSettings, {"arc_margin": 2.0}, "arc_margin"),
    (McipSettings, {"mc_weight": 1.5}, "mc_weight"),
    (RealignSettings, {"last_blocks": -1}, "last_blocks"),
    (RealignSettings, {"precision": "fp64"}, "precision"),
])
def test_training_settings_name_the_field(settings: type, config: dict, field: str):
    with pytest.raises(pydantic.ValidationError) as info:
        settings(**config)
    assert field in str(info.value)


def test_wrong_type_is_refused_before_the_run_starts(tmp_path: Path):
    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        dg.materialize(assets_named("evaluation_report"), resources=tiny_resources(tmp_path, tmp_path, None),
                       run_config={"ops": {"evaluation_report": {"config": {"alignment_tolerance": "high"}}}})
    assert "alignment_tolerance" in str(info.value)
    with pytest.raises(dg.DagsterInvalidConfigError, match="serve_variant"):
        dg.materialize(assets_named("evaluation_report"), resources=tiny_resources(tmp_path, tmp_path, None),
                       run_config={"ops": {"evaluation_report": {"config": {"serve_variant": "best"}}}})
    assert _nothing_published(tmp_path)


def test_in_a_full_run_the_bad_step_fails_first_and_keeps_upstream_outputs(tmp_path: Path, shapes_source: Path):
    """Documented limit: Dagster's schema has no ranges, so a range error fails its *own* step at start.

    Upstream steps of the same run have already run (their outputs are valid and kept); nothing of
    the misconfigured step or below is produced.
    """
    names = ("raw_images", "image_manifest", "image_splits", "base_model", "retrieval_encoder")
    result = materialize(names, tmp_path, shapes_source, ops={"image_splits": {"config": {"val_fraction": 1.5}}})
    assert not result.success
    assert [e.step_key for e in result.get_step_failure_events()] == ["image_splits"]
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "retrieval_encoder" not in done and "image_splits" not in done
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    assert store.exists("data/manifest.parquet") and not store.exists("data/splits.parquet")
