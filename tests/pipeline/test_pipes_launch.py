"""Training assets launched through Dagster Pipes (clipopt_dagster.launchers) on tiny data.

The upstream assets are materialised once; ``retrieval_encoder`` is then materialised in process
(the default), as a Pipes subprocess, and as a Pipes subprocess under torchrun with two gloo
ranks. The child reads its inputs from the store, publishes the checkpoint itself and reports the
metrics: they must arrive as the asset's materialisation metadata, like the in-process ones.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from clipopt_core.layout import Keys
from clipopt_core.models.loading import ModelSpec, checkpoint_spec, load_model
from clipopt_core.train.job import StageRequest
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.assets_data import base_model, caption_corpus, image_manifest, image_splits, raw_images
from clipopt_dagster.assets_training import TRAINING_ASSETS
from clipopt_dagster.launchers import TrainingLauncher, launcher_from_env
from clipopt_dagster.resources import ComputeResource
from tests.pipeline.conftest import tiny_resources, tiny_run_config

UPSTREAM = [raw_images, image_manifest, image_splits, base_model]
TRAINING = {asset.key.path[-1]: asset for asset in TRAINING_ASSETS}


def run_config(*names: str) -> dict:
    ops = tiny_run_config()["ops"]
    return {"ops": {name: ops[name] for name in names if name in ops}}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, shapes_source: Path) -> Path:
    tmp = tmp_path_factory.mktemp("pipes")
    result = dg.materialize(UPSTREAM, resources=tiny_resources(tmp, shapes_source, None),
                            run_config=run_config("base_model", "image_splits"))
    assert result.success
    return tmp


def materialize_encoder(tmp: Path, shapes_source: Path, launcher: TrainingLauncher | None,
                        cache: str) -> tuple[dict, list[str], Path]:
    """Train retrieval_encoder into a copy of the upstream store (one store per launcher: in a shared
    store the second launcher would reuse the first one's checkpoint, the inputs being the same)."""
    store = tmp / f"{cache}-artifacts"
    shutil.copytree(tmp / "artifacts", store)
    resources = tiny_resources(tmp, shapes_source, None, store_url=f"file://{store}")
    resources["compute"] = ComputeResource(cache_dir=str(tmp / cache), torch_threads=1, launcher=launcher)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([TRAINING["retrieval_encoder"]], resources=resources,
                            run_config=run_config("retrieval_encoder"), instance=instance)
    assert result.success
    metadata = result.asset_materializations_for_node("retrieval_encoder")[0].metadata
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    return {key: value.value for key, value in metadata.items()}, logs, store


@pytest.fixture(scope="module")
def in_process(upstream: Path, shapes_source: Path) -> tuple[dict, Path]:
    metadata, _, store = materialize_encoder(upstream, shapes_source, None, "cache-in-process")
    return metadata, store


@pytest.mark.parametrize("nproc", [1, 2])
def test_pipes_subprocess_materialises_with_the_childs_metrics(upstream: Path, shapes_source: Path,
                                                             in_process: tuple[dict, Path], nproc: int) -> None:
    launcher = TrainingLauncher(mode="pipes_subprocess", nproc_per_node=nproc)
    metadata, logs, store_dir = materialize_encoder(upstream, shapes_source, launcher, f"cache-pipes-{nproc}")
    in_process, _ = in_process
    assert metadata["launched_by"] == "dagster-pipes" and metadata["world_size"] == nproc
    assert isinstance(metadata["best_val_score"], float) and 0.0 <= metadata["best_val_score"] <= 1.0
    assert metadata["steps"] == in_process["steps"] > 0  # same global batches per step whatever the ranks
    assert metadata["identity"] == in_process["identity"] and metadata["reused"] is False
    assert set(in_process) <= set(metadata)  # every in-process metadata key is reported by the child too
    assert "| step | val_score |" in metadata["validation_history"]
    assert any("training retrieval_encoder (retrieval) on" in line for line in logs)  # the child's Pipes log
    assert any("val_score=" in line for line in logs)
    store = ArtifactStore(f"file://{store_dir}")
    assert store.url(Keys.model("retrieval_encoder")) == metadata["uri"]
    folder = store.get_dir(Keys.model("retrieval_encoder"), upstream / f"download-{nproc}")
    assert load_model(checkpoint_spec(folder), cache_dir=upstream / "cache").embed_dim == 32


def test_realign_launched_on_two_ranks_downloads_the_encoder_and_publishes(upstream: Path, shapes_source: Path,
                                                                          in_process: tuple[dict, Path]) -> None:
    _, store_dir = in_process  # holds the in-process retrieval_encoder
    resources = tiny_resources(upstream, shapes_source, None, store_url=f"file://{store_dir}")
    assert dg.materialize([caption_corpus], resources=resources).success
    resources["compute"] = ComputeResource(cache_dir=str(upstream / "cache-realign"), torch_threads=1,
                                           launcher=TrainingLauncher(mode="pipes_subprocess", nproc_per_node=2))
    result = dg.materialize([TRAINING["realigned_2sft"]], resources=resources, run_config=run_config("realigned_2sft"))
    assert result.success
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("realigned_2sft")[0].metadata.items()}
    assert metadata["world_size"] == 2 and metadata["steps"] > 0 and metadata["stage"] == "realigned_2sft"
    assert ArtifactStore(f"file://{store_dir}").exists(f"{Keys.model('realigned_2sft')}/_COMPLETE.json")


def test_default_launcher_is_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPOPT_LAUNCHER", raising=False)
    assert launcher_from_env() is None and ComputeResource().launcher is None
    monkeypatch.setenv("CLIPOPT_LAUNCHER", "pipes_subprocess")
    monkeypatch.setenv("CLIPOPT_NPROC_PER_NODE", "4")
    launcher = launcher_from_env()
    assert launcher.launches and launcher.command()[1:] == ["-m", "torch.distributed.run", "--standalone",
                                                            "--nproc-per-node=4", "-m", "clipopt_dagster.pipes_child"]


def test_k8s_mode_builds_a_gpu_pod_spec_and_needs_an_image() -> None:
    launcher = TrainingLauncher(mode="pipes_k8s", nproc_per_node=8, gpus_per_pod=8)
    assert launcher.command()[:3] == ["python", "-m", "torch.distributed.run"]
    assert launcher.pod_spec()["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    with pytest.raises(ValueError, match="needs image="):
        launcher._k8s_client()


def test_stage_request_round_trips_and_validates_its_settings() -> None:
    request = StageRequest(asset="2sft", store_url="file:///x", cache_dir="/c", settings={"last_blocks": 2, "lr": 1e-4})
    assert request.asset == "realigned_2sft" and request.stage.kind == "realign"  # variant names resolve to the asset
    assert StageRequest.from_json(request.to_json()) == request
    assert request.config().last_blocks == 2 and request.config().train.lr == 1e-4
    with pytest.raises(ValueError, match="unknown stage 'stage9'"):
        StageRequest(asset="stage9", store_url="/x", cache_dir="/c")
    with pytest.raises(ValueError, match=r"TrainConfig.epochs must be ≥ 1; got 0"):
        StageRequest(asset="retrieval_encoder", store_url="/x", cache_dir="/c", settings={"epochs": 0})
    with pytest.raises(ValueError, match="mc_weight cannot be set"):
        StageRequest(asset="stage1", store_url="/x", cache_dir="/c", settings={"mc_weight": 0.5})
    assert ModelSpec(**{"name": "clipopt-tiny", "pretrained": None, "image_size": None}).name == "clipopt-tiny"


def test_clipopt_core_imports_neither_dagster_nor_dagster_pipes() -> None:
    """Only running ``clipopt_dagster.pipes_child`` as a program imports ``dagster_pipes``; nothing imports dagster."""
    code = ("import importlib, pkgutil, sys, clipopt_core\n"
            "for m in pkgutil.walk_packages(clipopt_core.__path__, 'clipopt_core.'): importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('dagster', 'dagster_pipes')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
