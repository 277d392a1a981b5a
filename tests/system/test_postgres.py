"""The production instance profile (deploy/dagster.postgres.yaml) on a real PostgreSQL 15 server.

One server per module (initdb + pg_ctl on 127.0.0.1, a free port); each test gets its own DAGSTER_HOME
with the shipped profile. The tests materialise the tiny graph and read the run back over GraphQL, run
two concurrent runs through the ``clipopt_gpu`` pool (limit 1), and let ``dagster-daemon`` evaluate the
sensor and the schedule (runs stay queued: the profile's run queue is set to 0 here, so no run starts).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.pipeline.conftest import tiny_resources, tiny_run_config
from tests.system.conftest import VENV_BIN, ManagedProcess, running, wait_for
from tests.system.postgres_server import PostgresServer

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "deploy" / "dagster.postgres.yaml"
RUNS = "query { runsOrError { ... on Runs { results { runId status jobName } } } }"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running(PostgresServer()) as server:
        yield server


@pytest.fixture
def home(postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME with the shipped Postgres profile, its variables set, on a wiped database."""
    for name, value in postgres.env().items():
        monkeypatch.setenv(name, value)
    folder = tmp_path / "dagster_home"
    folder.mkdir()
    shutil.copy(PROFILE, folder / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(folder))
    with dg.DagsterInstance.get() as instance:
        instance.wipe()
    return folder


def test_server_is_postgres_15_and_the_profile_uses_it(postgres, home):
    from dagster_postgres import PostgresRunStorage

    assert postgres.version() >= 15
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert instance.run_monitoring_enabled


def test_tiny_graph_materialises_and_reads_back_over_graphql(home, tmp_path, shapes_source, caption_source,
                                                            monkeypatch):
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    from clipopt_dagster.definitions import ASSET_CHECKS, ASSETS
    from clipopt_dagster.partitions import ALL_SHARDS_TAGS

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=tiny_resources(tmp_path, shapes_source, caption_source),
                                run_config=tiny_run_config(), tags=ALL_SHARDS_TAGS, instance=instance)
        assert result.success
        monkeypatch.chdir(ROOT)
        with define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context:
            runs = execute_dagster_graphql(context, RUNS).data["runsOrError"]["results"]
    assert [(r["runId"], r["status"]) for r in runs] == [(result.run_id, "SUCCESS")]
    with dg.DagsterInstance.get() as fresh:  # another process's view: everything is in Postgres
        assert fresh.get_latest_materialization_event(dg.AssetKey("faiss_index")) is not None


def test_pool_limit_of_one_serialises_two_concurrent_runs(home, tmp_path):
    log = tmp_path / "pool.log"
    env = {**os.environ, "POOL_LOG": str(log), "POOL_HOLD_S": "4", "PYTHONPATH": str(ROOT)}
    command = [str(VENV_BIN / "dg"), "launch", "--job", "pool_job", "-f", str(ROOT / "tests" / "system" / "pool_job.py")]
    processes = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for number, text in enumerate(outputs):
        (tmp_path / f"run{number}.log").write_text(text)
    failed = [text[-4000:] for process, text in zip(processes, outputs) if process.returncode != 0]
    assert not failed, "\n".join(failed)
    spans = sorted((float(start), float(end)) for _, start, end in (line.split() for line in log.read_text().splitlines()))
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans  # the second held the slot only after the first
    assert any("blocked by limit for pool clipopt_gpu" in text for text in outputs)
    with dg.DagsterInstance.get() as instance:
        assert instance.event_log_storage.get_concurrency_info("clipopt_gpu").slot_count == 1


def test_daemon_ticks_the_sensor_and_schedule(home, shapes_source, caption_source, monkeypatch, tmp_path):
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    config["concurrency"]["runs"]["max_concurrent_runs"] = 0  # requested runs stay queued: nothing trains
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "CLIPOPT_IMAGES": str(shapes_source), "CLIPOPT_CAPTIONS": str(caption_source),
           "CLIPOPT_CACHE": str(tmp_path / "cache"), "CLIPOPT_RETRAIN_CRON": "* * * * *", "PYTHONPATH": str(ROOT)}
    for kind, name in (("sensor", "new_images_sensor"), ("schedule", "weekly_retraining")):
        subprocess.run([str(VENV_BIN / "dagster"), kind, "start", name, "-w", str(ROOT / "workspace.yaml")], env=env,
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
    daemon = ManagedProcess("dagster-daemon", [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
                            tmp_path / "daemon.log", env=env, cwd=ROOT)
    daemon.start()
    try:
        with dg.DagsterInstance.get() as instance:
            def ticked() -> bool:
                runs = instance.get_runs()
                return {r.tags.get("dagster/sensor_name") or r.tags.get("dagster/schedule_name") for r in runs} >= {
                    "new_images_sensor", "weekly_retraining"}
            wait_for(ticked, 240, "a queued run from the sensor and one from the schedule", interval=2,
                     alive=daemon.died)
            runs = instance.get_runs()
    finally:
        daemon.stop()
    assert {run.status for run in runs} == {dg.DagsterRunStatus.QUEUED}
    sensor_run = next(r for r in runs if r.tags.get("dagster/sensor_name"))
    assert sensor_run.tags["clipopt/source_fingerprint"] and sensor_run.job_name == "retraining_job"
