"""Data-parallel training under torchrun (clipopt_core.runtime.distributed) equals one process on the same global batch.

Two gloo ranks (``torchrun --standalone``, a free local port) and one plain process run the same
scenarios of ``_ddp_worker.py`` with global batch 8: stage 1 (ArcMargin; BatchNorm frozen in eval,
so per-rank batch statistics do not matter), MCIP (MCArcMargin over the gathered global batch) and
realign (InfoNCE over text embeddings gathered with gradient; its last batch of 5 splits 3 + 2).
Loss trajectories must agree to 1e-5 relative and the final weights to ~1e-5. A checkpoint written
by one process is resumed by two ranks and matches an uninterrupted run (the global step is stored).
Stage 1 and MCIP with ArcMargin proxies sharded by class (``proxy_sharding="sharded"``: each rank holds
half the rows) match both the replicated two-rank run and one process, and a checkpoint written sharded
holds the whole proxies and resumes in one plain (replicated) process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from clipopt_core.runtime import distributed
from clipopt_core.data.datasets import EpochBatches
from clipopt_core.data.manifest import ingest, scan_source
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.runtime.storage import ArtifactStore

WORKER = Path(__file__).with_name("_ddp_worker.py")
DDP_SCENARIOS = ("stage1", "mcip", "realign", "resume", "stage1_sharded", "mcip_sharded", "resume_prefix_sharded",
                 "arc_loss")
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(shapes_source: Path) -> pl.DataFrame:
    return ingest(str(shapes_source), scan_source(str(shapes_source))).accepted


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, rows: pl.DataFrame) -> tuple[Path, Path]:
    """(single-process outputs, 2-rank outputs) of every scenario; ``single/from_sharded/resume``: the 2-rank
    sharded 2-step checkpoint resumed to 4 steps by one process."""
    tmp = tmp_path_factory.mktemp("ddp")
    data, single, ranks = tmp / "data", tmp / "single", tmp / "ranks"
    data.mkdir()
    rows.select("uri", "label").write_parquet(data / "rows.parquet")
    worker = _worker_module()
    for scenario in ("stage1", "mcip", "realign", "resume_prefix", "resume"):
        worker.run(scenario, data, single)
    worker.arc_loss(single)
    shutil.copytree(single / "resume_prefix" / "work", ranks / "resume" / "work")  # 2 steps by 1 process
    torchrun(str(WORKER), "--data", str(data), "--out", str(ranks), "--scenarios", ",".join(DDP_SCENARIOS))
    shutil.copytree(ranks / "resume_prefix_sharded" / "work", single / "from_sharded" / "resume" / "work")
    worker.run("resume", data, single / "from_sharded")
    return single, ranks


def _events(folder: Path) -> dict:
    return json.loads((folder / "events.json").read_text())


@pytest.mark.parametrize("scenario", ["stage1", "mcip", "realign"])
def test_two_ranks_match_one_process(runs: tuple[Path, Path], scenario: str) -> None:
    single, ranks = (_events(root / scenario) for root in runs)
    assert (single["world_size"], ranks["world_size"]) == (1, 2)
    losses = [[e["loss"] for e in run["events"] if "loss" in e] for run in (single, ranks)]
    assert len(losses[0]) == len(losses[1]) == single["steps"] == ranks["steps"] >= 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert len(set(round(x, 3) for x in losses[0])) > 1  # it trained
    validations = [[(e["step"], e["val_score"]) for e in run["events"] if "val_score" in e] for run in (single, ranks)]
    assert validations[0] == validations[1] and validations[0]
    a, b = (load_file(str(root / scenario / "weights.safetensors")) for root in runs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{scenario} {key}: {m}")


def test_checkpoint_of_one_process_resumes_on_two_ranks(runs: tuple[Path, Path]) -> None:
    single, ranks = runs
    resumed = _events(ranks / "resume")
    assert [e["step"] for e in resumed["events"] if "loss" in e] == [3, 4]  # the stored step is global
    a = load_file(str(single / "resume" / "work" / "last" / "modules.safetensors"))
    b = load_file(str(ranks / "resume" / "work" / "last" / "modules.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5)
    uninterrupted = [e["loss"] for e in _events(single / "resume")["events"] if "loss" in e]
    assert [e["loss"] for e in resumed["events"] if "loss" in e] == pytest.approx(uninterrupted[2:], rel=1e-5)


def _losses(run: dict) -> list[float]:
    return [e["loss"] for e in run["events"] if "loss" in e]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{what} {key}: {m}")


@pytest.mark.parametrize("scenario", ["stage1", "mcip"])
def test_sharded_proxies_match_replicated_and_one_process(runs: tuple[Path, Path], scenario: str) -> None:
    single, ranks = runs
    one, replicated, sharded = _events(single / scenario), _events(ranks / scenario), _events(ranks / f"{scenario}_sharded")
    classes = one["proxy_rows"]
    assert replicated["proxy_rows"] == classes and sharded["proxy_rows"] == classes // 2  # rank 0 holds half the rows
    assert len(_losses(sharded)) == one["steps"] >= 4
    assert _losses(sharded) == pytest.approx(_losses(one), rel=1e-5)
    assert _losses(sharded) == pytest.approx(_losses(replicated), rel=1e-5)
    weights = load_file(str(ranks / f"{scenario}_sharded" / "weights.safetensors"))
    assert weights["arc.proxies"].shape[0] == classes  # gathered whole
    _assert_same_weights(load_file(str(single / scenario / "weights.safetensors")), weights, f"{scenario} vs 1 process")
    _assert_same_weights(load_file(str(ranks / scenario / "weights.safetensors")), weights, f"{scenario} vs replicated")


def test_sharded_loss_and_gradients_equal_one_process_on_an_uneven_split(runs: tuple[Path, Path]) -> None:
    one, two = (load_file(str(root / "arc_loss" / "grads.safetensors")) for root in runs)
    assert (int(one["proxy_rows"]), int(two["proxy_rows"])) == (7, 4)  # 7 classes: rank 0 holds 4, rank 1 3
    for key in ("loss", "features", "proxies"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    assert one["proxies"].abs().sum(dim=1).gt(0).sum() == 7  # every class got a gradient


def test_checkpoint_written_sharded_resumes_replicated(runs: tuple[Path, Path]) -> None:
    single, ranks = runs
    written = ranks / "resume_prefix_sharded" / "work" / "last"
    reference = single / "resume_prefix" / "work" / "last"  # the same 2 steps by one process
    for name in ("modules.safetensors", "optimizer.safetensors"):  # proxies and their AdamW moments whole
        _assert_same_weights(load_file(str(reference / name)), load_file(str(written / name)), name)
    resumed = _events(single / "from_sharded" / "resume")
    assert [e["step"] for e in resumed["events"] if "loss" in e] == [3, 4] and resumed["world_size"] == 1
    assert _losses(resumed) == pytest.approx(_losses(_events(single / "resume"))[2:], rel=1e-5)
    last = [root / "resume" / "work" / "last" / "modules.safetensors" for root in (single, single / "from_sharded")]
    _assert_same_weights(*(load_file(str(path)) for path in last), "resumed")  # (best = the copied prefix's)


def test_only_rank_zero_writes_the_work_folder(runs: tuple[Path, Path]) -> None:
    work = runs[1] / "stage1" / "work"
    assert sorted(p.name for p in work.iterdir()) == [".lock", "best.safetensors", "last"]
    assert json.loads((work / ".lock").read_text())["pid"] > 0  # one holder: rank 0


def test_torchrun_cli_train_publishes_one_checkpoint(tmp_path: Path, rows: pl.DataFrame) -> None:
    labels = sorted(set(rows["label"].to_list()))
    splits = rows.with_columns(pl.when(pl.col("label").is_in(labels[:12])).then(pl.lit("train")).otherwise(pl.lit("val"))
                               .alias("split"))
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    store.write_parquet("data/splits.parquet", splits)
    store.write_json("models/base/spec.json", {"spec": {"name": "clipopt-tiny"}, "weights_sha256": "tiny"})
    (tmp_path / "settings.json").write_text(json.dumps({"epochs": 1, "batch_size": 8, "lr": 1e-3, "precision": "fp32",
                                                        "max_steps": 3, "eval_every_steps": 100,
                                                        "validate_at_start": False}))
    done = torchrun("-m", "clipopt_core.cli.main", "train", "--stage", "stage1", "--store", store.url(""),
                    "--settings", str(tmp_path / "settings.json"), "--cache", str(tmp_path / "cache"))
    summary = json.loads(done.stdout)  # exactly one JSON document: only rank 0 prints
    assert summary["steps"] == 3 and summary["best_step"] == 3 and summary["world_size"] == 2
    checkpoint = store.get_dir("models/retrieval_encoder", tmp_path / "download")
    sidecar = json.loads((checkpoint / "clipopt.json").read_text())
    assert sidecar["stage"] == "retrieval_encoder" and sidecar["steps"] == 3
    trained = load_model(ModelSpec(f"local-dir:{checkpoint}"), cache_dir=tmp_path / "cache").model
    base = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path / "cache").model
    changed = {n for n, t in trained.state_dict().items() if not torch.equal(t, base.state_dict()[n])}
    assert changed and all(n.startswith("visual.") for n in changed)


# ------------------------------------------------------------------ helpers, single process

def test_helpers_are_identities_outside_torchrun() -> None:
    batches = EpochBatches(48, 8, seed=0)
    assert distributed.shard_batches(batches) is batches
    rows = torch.arange(5)
    assert distributed.local_rows(rows) is rows
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.gather_rows(x) is x
    assert distributed.broadcast_float(0.5) == 0.5 and distributed.average_stats({"loss": 2.0}) == {"loss": 2.0}
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.is_follower()) == (0, 1, True, False)


def test_sharded_batches_split_each_global_batch_into_disjoint_contiguous_slices() -> None:
    batches = EpochBatches(48, 8, seed=3, epoch=1)
    slices = [list(distributed.ShardedBatches(batches, rank, 4)) for rank in range(4)]
    for step, global_batch in enumerate(batches):
        assert [item for rank in range(4) for item in slices[rank][step]] == global_batch
    assert all(len(part) == len(batches) for part in slices)


@pytest.mark.parametrize("total,world", [(16, 2), (10, 3), (5, 5), (7, 4)])
def test_row_ranges_tile_the_rows_like_tensor_split(total: int, world: int) -> None:
    ranges = [distributed.row_range(total, at=(r, world)) for r in range(world)]
    assert [stop - start for start, stop in ranges] == [len(part) for part in torch.tensor_split(torch.arange(total), world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert distributed.row_range(total) == (0, total)  # a plain process holds every row
    full = torch.arange(total * 2).view(total, 2)
    assert distributed.row_shard(full) is full and torch.equal(distributed.gather_shard(full), full)
