"""A SIGKILLed run releases its pool slot at the start of the next run (no daemon), on sqlite and Postgres.

Run A (tests/system/pool_job.py through ``dg launch``, the shipped instance profile with
``clipopt_gpu`` limited to 1) is killed while it holds the slot. Run B then must get the slot: the
code location's executor finds A's process gone, marks A failed, frees its slot and says so in B's log.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import dagster as dg
import pytest

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
