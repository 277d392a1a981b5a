"""A SIGKILLed run releases its pool slot at the start of the next run (no daemon), on sqlite and Postgres.

Run A (tests/system/pool_job.py through ``dg launch``, the shipped instance profile with
``clipopt_gpu`` limited to 1) is killed while it holds the slot. Run B then must get the slot: the
code location's executor finds A's process gone, marks A failed, frees its slot and says so in B's log.

The same with real training: ``dg launch --assets raw_images,…,retrieval_encoder`` of the project's code location,
killed mid-training after a checkpoint; the next launch frees the slot, resumes from the checkpoint
and publishes the bytes an uninterrupted launch publishes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.pipeline.conftest import tiny_run_config
from tests.reliability.conftest import SLOW_TRAIN
from tests.system.conftest import VENV_BIN, wait_for
from tests.system.postgres_server import PostgresServer

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [str(VENV_BIN / "dg"), "launch", "--job", "pool_job", "-f", str(ROOT / "tests" / "system" / "pool_job.py")]


@pytest.fixture(params=["sqlite", "postgres"])
def home(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "dagster_home"
    folder.mkdir()
    if request.param == "sqlite":
        shutil.copy(ROOT / "dagster.yaml", folder / "dagster.yaml")
    else:
        server = PostgresServer()
        server.start()
        request.addfinalizer(server.stop)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        shutil.copy(ROOT / "deploy" / "dagster.postgres.yaml", folder / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(folder))
    return folder


def test_next_run_frees_the_slot_of_a_killed_run(home, tmp_path):
    env = {**os.environ, "POOL_LOG": str(tmp_path / "pool.log"), "PYTHONPATH": str(ROOT)}
    started = tmp_path / "started"
    killed = subprocess.Popen(COMMAND, env={**env, "POOL_HOLD_S": "900", "POOL_STARTED": str(started)}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(started.exists, 240, "run A holding the clipopt_gpu slot", interval=0.5)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(30)
    with dg.DagsterInstance.get() as instance:
        [victim] = instance.get_runs()
        assert victim.status == dg.DagsterRunStatus.STARTED  # nobody told the instance
        assert [c.run_id for c in instance.event_log_storage.get_concurrency_info("clipopt_gpu").claimed_slots] == [
            victim.run_id]

    follow = subprocess.run(COMMAND, env={**env, "POOL_HOLD_S": "1"}, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    output = follow.stdout + follow.stderr
    assert follow.returncode == 0, output[-3000:]
    assert f"freed the clipopt_gpu pool slot(s) of run {victim.run_id}" in output
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(victim.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("clipopt_gpu").claimed_slots == []
    assert len((tmp_path / "pool.log").read_text().splitlines()) == 1  # only run B finished its step


def test_a_live_holder_is_not_released(home, tmp_path):
    """Changed input: the holder's process still exists, so its slot stays claimed (no false release)."""
    from clipopt_dagster.run_claims import HOST_TAG, PID_TAG, release_dead_claims

    import socket

    with dg.DagsterInstance.get() as instance:
        run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), run_id=None)
        instance.handle_run_event(run.run_id, dg.DagsterEvent("PIPELINE_START", "g"))  # mark STARTED
        instance.add_run_tags(run.run_id, {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
        instance.event_log_storage.initialize_concurrency_limit_to_default("clipopt_gpu")
        assert instance.event_log_storage.claim_concurrency_slot("clipopt_gpu", run.run_id, "step").is_claimed
        messages: list[str] = []
        logger = type("L", (), {"warning": lambda self, m: messages.append(m)})()
        assert release_dead_claims(instance, "another-run", logger) == [] and messages == []
        instance.add_run_tags(run.run_id, {PID_TAG: str(2**22 + 12345)})  # beyond pid_max: no such process
        assert release_dead_claims(instance, "another-run", logger) == [run.run_id] and len(messages) == 1


TRAINING = ["raw_images", "image_manifest", "image_splits", "base_model", "retrieval_encoder"]
WEIGHTS = Path("models") / "retrieval_encoder" / "open_clip_model.safetensors"


def _launch_training(tmp_path: Path, name: str, shapes: Path, **extra_env: str) -> subprocess.Popen:
    """``dg launch`` of retrieval_encoder and its upstream assets in the code location, with its own cache and artifacts."""
    config = tmp_path / "training.yaml"
    ops = {k: v for k, v in tiny_run_config(retrieval_encoder={"config": {**SLOW_TRAIN, "epochs": 40}})["ops"].items()
           if k in TRAINING}
    config.write_text(yaml.safe_dump({"ops": ops}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "CLIPOPT_IMAGES": str(shapes), "CLIPOPT_CAPTIONS": "", "CLIPOPT_CACHE": str(tmp_path / name / "cache"),
           "CLIPOPT_ARTIFACTS": f"file://{tmp_path / name / 'artifacts'}", **extra_env}
    command = [str(VENV_BIN / "dg"), "launch", "--assets", ",".join(TRAINING), "-m", "clipopt_dagster.definitions",
               "-c", str(config)]
    log = open(tmp_path / f"{name}.log", "a")  # the child keeps its own descriptor
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _checkpoint_step(tmp_path: Path, name: str) -> int:
    states = list((tmp_path / name / "cache" / "work" / "retrieval_encoder").glob("*/last/state.json"))
    try:
        return json.loads(states[0].read_text())["state"]["step"] if states else 0
    except (json.JSONDecodeError, OSError):  # caught between the checkpoint's write and rename
        return 0


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory: pytest.TempPathFactory, shapes_source: Path) -> bytes:
    """The weights an uninterrupted launch publishes (its own sqlite instance from the repo's dagster.yaml)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "home").mkdir()
    shutil.copy(ROOT / "dagster.yaml", folder / "home" / "dagster.yaml")
    reference = _launch_training(folder, "reference", shapes_source, DAGSTER_HOME=str(folder / "home"))
    assert reference.wait(600) == 0, (folder / "reference.log").read_text()[-3000:]
    return (folder / "reference" / "artifacts" / WEIGHTS).read_bytes()


@pytest.mark.slow
def test_a_training_run_killed_mid_stage_resumes_in_the_next_run_and_publishes_the_same_weights(
        home, tmp_path, shapes_source, uninterrupted_weights):
    victim = _launch_training(tmp_path, "victim", shapes_source)
    try:
        wait_for(lambda: _checkpoint_step(tmp_path, "victim") >= 24 or victim.poll() is not None, 300,
                 "run A's checkpoint at step 24", interval=0.01)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)
    killed_at = _checkpoint_step(tmp_path, "victim")
    assert victim.returncode == -signal.SIGKILL and 24 <= killed_at < 320, f"killed at step {killed_at}"
    assert not (tmp_path / "victim" / "artifacts" / WEIGHTS).exists()

    rerun = _launch_training(tmp_path, "victim", shapes_source)
    assert rerun.wait(600) == 0, (tmp_path / "victim.log").read_text()[-3000:]
    output = (tmp_path / "victim.log").read_text()
    assert "freed the clipopt_gpu pool slot(s) of run" in output
    steps = [int(step) for step in re.findall(r"step=(\d+), ", output.split("freed the clipopt_gpu pool slot(s)")[1])]
    assert steps and steps[0] > killed_at, steps[:3]  # resumed from the checkpoint, did not start over
    published = (tmp_path / "victim" / "artifacts" / WEIGHTS).read_bytes()
    assert published == uninterrupted_weights
    with dg.DagsterInstance.get() as instance:
        statuses = sorted(run.status.value for run in instance.get_runs())
        assert statuses == ["FAILURE", "SUCCESS"]  # the killed run was marked failed
        assert instance.event_log_storage.get_concurrency_info("clipopt_gpu").claimed_slots == []
