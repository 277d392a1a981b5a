"""The `clipopt` CLI against a store filled by a real materialisation of the whole graph."""
import json
import shutil
import subprocess
import sys

import dagster as dg
import pytest
import torch

from clipopt_core.cli import main as cli
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.registry import get_stage
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.definitions import ASSET_CHECKS, ASSETS
from clipopt_dagster.partitions import ALL_SHARDS_TAGS
from tests.pipeline.conftest import tiny_resources, tiny_run_config


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, shapes_source, caption_source):
    tmp = tmp_path_factory.mktemp("cli")
    result = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=tiny_resources(tmp, shapes_source, caption_source),
                            run_config=tiny_run_config(), tags=ALL_SHARDS_TAGS)
    assert result.success
    return tmp, f"file://{tmp / 'artifacts'}"


def test_report_prints_every_variant(filled_store, capsys, monkeypatch):
    _, url = filled_store
    assert cli.main(["report", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "reports/evaluation.md" in out and "reports/teaser.png" in out
    for variant in ("baseline", "stage1", "2sft", "mcip", "mcip_realign"):
        assert f"| {variant} |" in out


def test_search_by_image_finds_itself_first(filled_store, monkeypatch):
    tmp, url = filled_store
    monkeypatch.setenv("CLIPOPT_CACHE", str(tmp / "cache"))
    manifest = ArtifactStore(url).read_parquet("data/manifest.parquet")
    query = manifest.row(5, named=True)
    hits = cli.run_search(url, image=query["uri"], k=3)
    assert len(hits) == 3 and hits[0]["image_id"] == query["image_id"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_search_by_text_returns_ranked_hits_with_metadata(filled_store, monkeypatch):
    tmp, url = filled_store
    monkeypatch.setenv("CLIPOPT_CACHE", str(tmp / "cache"))
    hits = cli.run_search(url, text="a red circle", k=4)
    assert [hit["rank"] for hit in hits] == [0, 1, 2, 3]
    assert {"image_id", "uri", "label", "caption", "source", "score"} <= set(hits[0])


def test_search_without_index_names_the_missing_artifact(tmp_path, capsys):
    assert cli.main(["search", "--store", f"file://{tmp_path}", "--text", "x"]) == 2
    assert "materialise faiss_index" in capsys.readouterr().err


TRAIN_SETTINGS = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "precision": "fp32", "eval_every_steps": 2,
                  "validate_at_start": False}


@pytest.mark.parametrize("stage", ["stage1", "mcip", "2sft"])
def test_train_command_runs_each_stage_kind_and_publishes_a_loadable_checkpoint(filled_store, tmp_path, stage):
    tmp, url = filled_store
    store_dir = tmp_path / "store"
    shutil.copytree(tmp / "artifacts", store_dir)  # the module's store stays as the graph left it
    (tmp_path / "settings.json").write_text(json.dumps(TRAIN_SETTINGS))
    completed = subprocess.run([sys.executable, "-m", "clipopt_core.cli.main", "train", "--stage", stage, "--store",
                                f"file://{store_dir}", "--settings", str(tmp_path / "settings.json"),
                                "--cache", str(tmp / "cache")], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["steps"] >= 1 and summary["reused"] is False and summary["variant"] == stage
    asset = get_stage(stage).asset
    checkpoint = ArtifactStore(f"file://{store_dir}").get_dir(f"models/{asset}", tmp_path / "download")
    sidecar = json.loads((checkpoint / "clipopt.json").read_text())
    assert sidecar["stage"] == asset and sidecar["identity"] == summary["identity"]
    trained = load_model(ModelSpec(f"local-dir:{checkpoint}"), cache_dir=tmp / "cache").model
    start = (ModelSpec("clipopt-tiny") if get_stage(stage).kind != "realign" else
             ModelSpec(f"local-dir:{ArtifactStore(url).get_dir('models/retrieval_encoder', tmp_path / 'encoder')}"))
    base = load_model(start, cache_dir=tmp / "cache").model
    changed = {name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, base.state_dict()[name])}
    assert changed and (all(n.startswith("visual.") for n in changed) if get_stage(stage).kind != "realign"
                        else not any(n.startswith("visual.") for n in changed))


def test_train_command_names_a_bad_setting_and_an_unknown_model(filled_store, tmp_path, capsys):
    tmp, _ = filled_store
    (tmp_path / "settings.json").write_text(json.dumps({"lr": -1}))
    assert cli.main(["train", "--stage", "stage1", "--store", f"file://{tmp / 'artifacts'}",
                     "--settings", str(tmp_path / "settings.json")]) == 2
    assert "TrainConfig.lr must be > 0.0; got -1" in capsys.readouterr().err
    store = tmp_path / "store"
    shutil.copytree(tmp / "artifacts", store)
    ArtifactStore(f"file://{store}").write_json("models/base/spec.json", {"spec": {"name": "ViT-B-23"}})
    assert cli.main(["train", "--stage", "stage1", "--store", f"file://{store}", "--cache", str(tmp / "cache")]) == 2
    error = capsys.readouterr().err
    assert "unknown model name 'ViT-B-23'" in error and "ViT-B-32" in error
