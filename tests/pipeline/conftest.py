"""Fixtures for materialising the whole asset graph on tiny data with the tiny model."""
from pathlib import Path

import dagster as dg
import pytest

from clipopt_dagster.resources import ArtifactStoreResource, CatalogResource, ComputeResource, DataSourceResource

# The tiny validation split is saturated (a random-init model already scores mAP 1.0 on it), so
# scoring the starting weights would keep them: the graph tests switch that off to exercise training.
TINY_TRAIN = {"epochs": 4, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "eval_every_steps": 3,
              "checkpoint_every_steps": 2, "patience": 5, "validate_at_start": False}


def tiny_run_config(**overrides: dict) -> dict:
    """Run config for every asset: tiny model, tiny batches, short prompts."""
    ops = {
        "base_model": {"config": {"name": "clipopt-tiny"}},
        "image_splits": {"config": {"val_fraction": 0.25, "test_fraction": 0.3, "seed": 0}},
        "pseudo_captions": {"config": {"top_k": 3, "threshold": None, "threshold_quantile": 0.3}},
        "retrieval_encoder": {"config": TINY_TRAIN},
        "mcip_encoder": {"config": TINY_TRAIN},
        "realigned_2sft": {"config": {**TINY_TRAIN, "batch_size": 16}},
        "realigned_mcip": {"config": {**TINY_TRAIN, "batch_size": 16}},
        # Two held-out classes cannot show a real gain: the plumbing tests relax the check
        # thresholds; tests/pipeline/test_checks.py tests the checks' logic on crafted reports.
        "evaluation_report": {"config": {"templates": "short", "serve_variant": "mcip_realign",
                                         "alignment_tolerance": 1.0, "min_i2i_gain": -1.0}},
        "faiss_index": {"config": {"kind": "auto", "target_recall": 0.9}},
        # one seed with the stages' own settings: the sweep reuses their work folders (same identities)
        "seed_sweep": {"config": {"seeds": [0], "templates": "short", "retrieval_encoder": TINY_TRAIN,
                                  "mcip_encoder": TINY_TRAIN, "realigned_2sft": {**TINY_TRAIN, "batch_size": 16},
                                  "realigned_mcip": {**TINY_TRAIN, "batch_size": 16}}},
    }
    ops.update(overrides)
    return {"ops": ops}


def retraining_run_config(**overrides: dict) -> dict:
    """:func:`tiny_run_config` for ``retraining_job``, which leaves the seed sweep out."""
    return {"ops": {name: op for name, op in tiny_run_config(**overrides)["ops"].items() if name != "seed_sweep"}}


def tiny_resources(tmp: Path, images: Path, captions: Path | None, store_url: str | None = None,
                   **store_options: str) -> dict[str, dg.ConfigurableResource]:
    return {
        "store": ArtifactStoreResource(base_url=store_url or f"file://{tmp / 'artifacts'}", **store_options),
        "compute": ComputeResource(cache_dir=str(tmp / "cache"), torch_threads=1),
        "sources": DataSourceResource(images=str(images), captions=str(captions) if captions else None),
        "catalog": CatalogResource(path=str(tmp / "catalogue.duckdb")),
    }


@pytest.fixture
def all_assets() -> list:
    from clipopt_dagster.definitions import ASSET_CHECKS, ASSETS

    return [*ASSETS, *ASSET_CHECKS]
