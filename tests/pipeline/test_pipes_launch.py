"""Training assets launched through Dagster Pipes (clipopt_dagster.launchers) on tiny data.

The upstream assets are materialised once; ``retrieval_encoder`` is then materialised in process
(the default), as a Pipes subprocess, and as a Pipes subprocess under torchrun with two gloo
ranks. The child reads its inputs from the store, publishes the checkpoint itself and reports the
metrics: they must arrive as the asset's materialisation metadata, like the in-process ones.
"""
import os
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
from clipopt_dagster.assets_training import realigned_2sft, retrieval_encoder
from clipopt_dagster.launchers import TrainingLauncher, launcher_from_env
from clipopt_dagster.resources import ComputeResource
from tests.pipeline.conftest import tiny_resources, tiny_run_config

UPSTREAM = [raw_images, image_manifest, image_splits, base_model]


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
                        cache: str) -> tuple[dict, list[str]]:
    resources = tiny_resources(tmp, shapes_source, None)
    resources["compute"] = ComputeResource(cache_dir=str(tmp / cache), torch_threads=1, launcher=launcher)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([retrieval_encoder], resources=resources, run_config=run_config("retrieval_encoder"),
                            instance=instance)
    assert result.success
    metadata = result.asset_materializations_for_node("retrieval_encoder")[0].metadata
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    return {key: value.value for key, value in metadata.items()}, logs


@pytest.fixture(scope="module")
def in_process(upstream: Path, shapes_source: Path) -> dict:
    return materialize_encoder(upstream, shapes_source, None, "cache-in-process")[0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_pipes_subprocess_materialises_with_the_childs_metrics(upstream: Path, shapes_source: Path, in_process: dict,
                                                             nproc: int) -> None:
    launcher = TrainingLauncher(mode="pipes_subprocess", nproc_per_node=nproc)
    metadata, logs = materialize_encoder(upstream, shapes_source, launcher, f"cache-pipes-{nproc}")
    assert metadata["launched_by"] == "dagster-pipes" and metadata["world_size"] == nproc
    assert isinstance(metadata["best_val_score"], float) and 0.0 <= metadata["best_val_score"] <= 1.0
    assert metadata["steps"] == in_process["steps"] > 0  # same global batches per step whatever the ranks
    assert set(in_process) <= set(metadata)  # every in-process metadata key is reported by the child too
    assert "| step | val_score |" in metadata["validation_history"]
    assert any("training retrieval_encoder (retrieval) on" in line for line in logs)  # the child's Pipes log
    assert any("val_score=" in line for line in logs)
    store = ArtifactStore(f"file://{upstream / 'artifacts'}")
    assert store.url(Keys.model("retrieval_encoder")) == metadata["uri"]
    folder = store.get_dir(Keys.model("retrieval_encoder"), upstream / f"download-{nproc}")
    assert load_model(checkpoint_spec(folder), cache_dir=upstream / "cache").embed_dim == 32


def test_realign_launched_on_two_ranks_downloads_the_encoder_and_publishes(upstream: Path, shapes_source: Path,
                                                                          in_process: dict) -> None:
    resources = tiny_resources(upstream, shapes_source, None)
    assert dg.materialize([caption_corpus], resources=resources).success
    resources["compute"] = ComputeResource(cache_dir=str(upstream / "cache-realign"), torch_threads=1,
                                           launcher=TrainingLauncher(mode="pipes_subprocess", nproc_per_node=2))
    result = dg.materialize([realigned_2sft], resources=resources, run_config=run_config("realigned_2sft"))
    assert result.success
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("realigned_2sft")[0].metadata.items()}
    assert metadata["world_size"] == 2 and metadata["steps"] > 0 and metadata["stage"] == "realigned_2sft"
    assert ArtifactStore(f"file://{upstream / 'artifacts'}").exists(f"{Keys.model('realigned_2sft')}/_COMPLETE.json")


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


def test_stage_request_round_trips_and_checks_its_stage() -> None:
    request = StageRequest(stage="realign", asset="realigned_2sft", store_url="file:///tmp/x", config={"last_blocks": 1},
                           work_dir="/w", cache_dir="/c", encoder="retrieval_encoder", image_size=32)
    assert StageRequest.from_json(request.to_json()) == request
    with pytest.raises(ValueError, match="stage must be one of"):
        StageRequest(stage="stage9", asset="a", store_url="/x", config={}, work_dir="/w", cache_dir="/c")
    with pytest.raises(ValueError, match="need 'model'"):
        StageRequest(stage="retrieval", asset="a", store_url="/x", config={}, work_dir="/w", cache_dir="/c")
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
