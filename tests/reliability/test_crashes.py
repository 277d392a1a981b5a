"""Crashes: SIGKILL mid-training, kills inside checkpoint swaps and store writes, idempotent re-runs."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore, StorageError
from clipopt_core.train.loop import LAST_DIR, fit
from clipopt_core.train.config import TrainConfig
from tests.conftest import write_shapes_source
from tests.reliability.conftest import (SLOW_TRAIN, TRAIN_ASSETS, ToyTask, kill_group, materialize, metadata,
                                        wait_for_file, worker, worker_json)

WEIGHTS = "models/retrieval_encoder/open_clip_model.safetensors"


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _validation_steps(log: Path) -> list[int]:
    return [int(step) for step in re.findall(r"step=(\d+), val_score=", log.read_text(errors="replace"))]


def test_sigkill_mid_training_then_rerun_is_bit_identical(tmp_path: Path, workers: list, record_property):
    """Kill -9 the whole run after its first checkpoint; the re-run resumes and publishes the same bytes
    as an uninterrupted run of the same config in another folder."""
    source = write_shapes_source(tmp_path / "src")
    args = ["--source", str(source), "--assets", ",".join(TRAIN_ASSETS), "--train", json.dumps(SLOW_TRAIN)]
    reference = worker("materialize", "--tmp", str(tmp_path / "ref"), *args, log=tmp_path / "ref.log")
    victim = worker("materialize", "--tmp", str(tmp_path / "victim"), *args, log=tmp_path / "victim.log")
    workers += [reference, victim]

    state = wait_for_file(str(tmp_path / "victim/cache/work/retrieval_encoder/*/last/state.json"), 120, victim,
                          interval=0.01)
    kill_group(victim)
    assert victim.returncode == -9
    killed_at = json.loads(Path(state).read_text())["state"]["step"]
    assert 0 < killed_at < 160, f"killed at step {killed_at}: training was not mid-run (make SLOW_TRAIN slower)"
    record_property("killed_after_checkpoint_step", killed_at)
    victim_store = ArtifactStore(f"file://{tmp_path / 'victim' / 'artifacts'}")
    assert not victim_store.exists(f"models/retrieval_encoder/{COMPLETE_MARKER}")

    rerun = worker("materialize", "--tmp", str(tmp_path / "victim"), *args, log=tmp_path / "rerun.log")
    workers.append(rerun)
    rerun_result, reference_result = worker_json(rerun), worker_json(reference)
    assert reference_result["success"] and rerun_result["success"], (tmp_path / "rerun.log").read_text()[-3000:]
    assert _validation_steps(tmp_path / "rerun.log")[0] > killed_at  # resumed, did not start over

    reference_store = ArtifactStore(f"file://{tmp_path / 'ref' / 'artifacts'}")
    assert victim_store.read_bytes(WEIGHTS) == reference_store.read_bytes(WEIGHTS)
    assert rerun_result["weights_sha256"] == reference_result["weights_sha256"]
    [work_a] = (tmp_path / "ref/cache/work/retrieval_encoder").iterdir()
    [work_b] = (tmp_path / "victim/cache/work/retrieval_encoder").iterdir()
    for name in ("modules.safetensors", "optimizer.safetensors"):  # the final training state too, not just "best"
        a, b = load_file(str(work_a / LAST_DIR / name)), load_file(str(work_b / LAST_DIR / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not [p.name for p in work_b.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert victim_store.list_temp_objects() == []

    # and materialising again changes nothing that was published (idempotent re-run)
    before = _tree_hashes(tmp_path / "victim" / "artifacts")
    again = materialize(TRAIN_ASSETS, tmp_path / "victim", source, ops={"retrieval_encoder": {"config": SLOW_TRAIN}})
    assert again.success
    assert metadata(again, "retrieval_encoder")["weights_sha256"] == reference_result["weights_sha256"]
    assert _tree_hashes(tmp_path / "victim" / "artifacts") == before


# ------------------------------------------------------------------ a kill inside the checkpoint swap

class _Killed(RuntimeError):
    pass


def test_kill_between_the_checkpoint_renames_resumes_instead_of_restarting(tmp_path: Path):
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, precision="fp32", checkpoint_every_steps=2,
                         eval_every_steps=3, patience=100)
    reference = ToyTask()
    fit(reference, config, tmp_path / "a")

    def crash(event: dict) -> None:
        if event.get("step") == 5 and "lr" in event:
            raise _Killed()
    with pytest.raises(_Killed):
        fit(ToyTask(), config, tmp_path / "b", log=crash)
    work = tmp_path / "b"
    # the state a SIGKILL between `last -> last.old-*` and `staging -> last` leaves, plus half-written files
    os.replace(work / LAST_DIR, work / f"{LAST_DIR}.old-0123")
    (work / f"{LAST_DIR}.tmp-4567").mkdir()
    (work / f"{LAST_DIR}.tmp-4567" / "modules.safetensors").write_bytes(b"half")
    (work / "best.safetensors.tmp-89ab").write_bytes(b"half")

    steps: list[int] = []
    resumed = ToyTask()
    fit(resumed, config, work, log=lambda e: steps.append(e["step"]) if "lr" in e else None)
    assert steps[0] == 5  # resumed from the step-4 checkpoint, not from scratch
    assert all(torch.equal(a, b) for a, b in zip(reference.modules.state_dict().values(),
                                                 resumed.modules.state_dict().values()))
    assert sorted(p.name for p in work.iterdir()) == [".lock", "best.safetensors", LAST_DIR]


# ------------------------------------------------------------------ kills in the middle of store writes

def test_kill_mid_write_bytes_leaves_the_old_version(tmp_path: Path, workers: list):
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    size = 8 << 20
    store.write_bytes("serving/index.faiss", b"O" * size)
    proc = worker("store-write", "--store", store.base_url, "--key", "serving/index.faiss", "--mode", "bytes",
                  "--ready", str(tmp_path / "ready"), "--size", str(size))
    workers.append(proc)
    wait_for_file(str(tmp_path / "ready"), 60, proc)
    kill_group(proc)
    assert store.read_bytes("serving/index.faiss") == b"O" * size  # readers still see the whole old version
    [leftover] = store.list_temp_objects()  # the half-written temp object: invisible to readers, listed for cleanup
    assert os.path.getsize(leftover) == size // 2 and ".tmp-" in leftover
    store.write_bytes("serving/index.faiss", b"N" * size)  # the re-run publishes the new version whole
    assert store.read_bytes("serving/index.faiss") == b"N" * size


def test_kill_mid_put_dir_leaves_an_unsealed_folder_that_readers_refuse(tmp_path: Path, workers: list):
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, fill in ((old, b"o"), (new, b"n")):
        folder.mkdir()
        (folder / "a.bin").write_bytes(fill * 4096)
        (folder / "b.bin").write_bytes(fill * (2 << 20))
    store.put_dir(old, "models/stage1")
    proc = worker("store-write", "--store", store.base_url, "--key", "models/stage1", "--mode", "dir", "--local",
                  str(new), "--ready", str(tmp_path / "ready"), "--hang-on", "2")
    workers.append(proc)
    wait_for_file(str(tmp_path / "ready"), 60, proc)
    kill_group(proc)
    assert store.read_bytes("models/stage1/a.bin") == b"n" * 4096  # first file replaced, second never finished
    assert store.read_bytes("models/stage1/b.bin") == b"o" * (2 << 20)
    with pytest.raises(StorageError, match="not a complete artifact"):  # never a mix of old and new
        store.get_dir("models/stage1", tmp_path / "download")
    assert not (tmp_path / "download").exists()
    store.put_dir(new, "models/stage1")  # re-publishing seals it again
    assert (store.get_dir("models/stage1", tmp_path / "download") / "b.bin").read_bytes() == b"n" * (2 << 20)


def test_kill_at_a_random_moment_of_repeated_large_writes(tmp_path: Path, workers: list):
    """No injection: a real writer killed wherever it happens to be; the key holds one whole version."""
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    size = 16 << 20
    proc = worker("store-write", "--store", store.base_url, "--key", "reports/evaluation.parquet", "--mode", "loop",
                  "--ready", str(tmp_path / "ready"), "--size", str(size))
    workers.append(proc)
    wait_for_file(str(tmp_path / "ready"), 60, proc)
    time.sleep(random.Random(os.getpid()).uniform(0.05, 0.4))
    kill_group(proc)
    data = store.read_bytes("reports/evaluation.parquet")
    assert len(data) == size and data.count(data[:1]) == size  # one complete version, never a mix
    assert all(os.path.getsize(p) <= size for p in store.list_temp_objects())
