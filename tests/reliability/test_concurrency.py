"""Concurrency: same-config training runs share a work folder (locked), and the DuckDB catalogue
is read while another process writes it (bounded retry with backoff)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import polars as pl
import pytest

from clipopt_core.runtime.locks import WorkDirLocked, work_dir_lock
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore
from clipopt_core.train.loop import fit
from clipopt_core.train.config import TrainConfig
from clipopt_dagster.resources import CatalogBusyError, CatalogResource
from tests.conftest import write_shapes_source
from tests.reliability.conftest import (SLOW_TRAIN, TRAIN_ASSETS, ToyTask, kill_group, wait_for_file, worker,
                                        worker_json)

# ------------------------------------------------------------------ the work-folder lock


def _holder(tmp_path: Path, workers: list, seconds: float = 3600) -> tuple[Path, int, float]:
    """A process holding the lock of ``tmp_path/work``: (work dir, its pid, wall-clock time it lets go)."""
    work = tmp_path / "work"
    proc = worker("hold-lock", "--work", str(work), "--ready", str(tmp_path / "held"), "--seconds", str(seconds))
    workers.append(proc)
    held = json.loads(Path(wait_for_file(str(tmp_path / "held"), 30, proc)).read_text())
    return work, held["pid"], held["release_at"]


def test_busy_lock_fails_after_the_bound_naming_the_holder(tmp_path: Path, workers: list):
    work, pid, _ = _holder(tmp_path, workers)
    messages: list[str] = []
    started = time.monotonic()
    with pytest.raises(WorkDirLocked) as info:
        with work_dir_lock(work, timeout_s=1.0, on_wait=messages.append):
            pass
    assert 1.0 <= time.monotonic() - started < 5
    assert f"locked by pid {pid}" in str(info.value) and info.value.holder_pid == pid
    assert len(messages) == 1 and f"pid {pid}" in messages[0]


def test_fit_waits_for_the_holder_then_trains(tmp_path: Path, workers: list):
    work, _, release_at = _holder(tmp_path, workers, seconds=2.0)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, precision="fp32")
    with pytest.raises(WorkDirLocked):  # a short bound: refused before any training
        fit(ToyTask(), config, work, lock_timeout_s=0.3)
    assert not (work / "last").exists()
    result = fit(ToyTask(), config, work, lock_timeout_s=30)
    assert time.time() >= release_at - 0.05 and result.steps == 8  # it waited for the holder, then ran whole


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path, workers: list):
    work, _, _ = _holder(tmp_path, workers)
    kill_group(workers[-1])
    started = time.monotonic()
    with work_dir_lock(work, timeout_s=5):
        assert time.monotonic() - started < 0.5


def test_lock_is_reentrant_in_one_thread(tmp_path: Path):
    with work_dir_lock(tmp_path, timeout_s=0.2):
        with work_dir_lock(tmp_path, timeout_s=0.2):  # the asset holds it while fit takes it again
            pass
        fit(ToyTask(), TrainConfig(epochs=1, batch_size=32, precision="fp32"), tmp_path, lock_timeout_s=0.2)


def test_two_runs_of_the_same_config_at_once_train_once_and_agree(tmp_path: Path, workers: list, record_property):
    """Two processes materialise image_manifest … retrieval_encoder into the same store and cache at once."""
    source = write_shapes_source(tmp_path / "src")
    args = ["--tmp", str(tmp_path / "shared"), "--source", str(source), "--assets", ",".join(TRAIN_ASSETS),
            "--train", json.dumps(SLOW_TRAIN)]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [worker("materialize", *args, "--go", str(tmp_path / "go"), "--ready", str(tmp_path / f"ready{n}"), log=log)
             for n, log in enumerate(logs)]
    workers += procs
    for n, proc in enumerate(procs):
        wait_for_file(str(tmp_path / f"ready{n}"), 120, proc)
    (tmp_path / "go").touch()  # both have imported everything: they start the run together
    results = [worker_json(proc, timeout=180) for proc in procs]
    assert all(r["success"] for r in results), [log.read_text()[-2000:] for log in logs]
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]

    texts = [log.read_text(errors="replace") for log in logs]
    assert sum("is locked by pid" in text for text in texts) == 1  # exactly one waited for the other
    validations = [len(re.findall(r"step=\d+, val_score=", text)) for text in texts]
    assert sorted(validations) == [0, 20]  # trained once (20 epochs); the waiter resumed the finished run
    record_property("waiter_log", next(line.split(" - ")[-1] for text in texts for line in text.splitlines()
                                       if "is locked by pid" in line))

    store = ArtifactStore(f"file://{tmp_path / 'shared' / 'artifacts'}")
    assert store.list_temp_objects() == []
    checkpoint = store.get_dir("models/retrieval_encoder", tmp_path / "download")  # hashes verified vs marker
    assert (checkpoint / COMPLETE_MARKER).exists()
    manifest = store.read_parquet("data/manifest.parquet")
    assert manifest.height == 48 and manifest["image_id"].n_unique() == 48


# ------------------------------------------------------------------ the DuckDB catalogue

def _report(run: str) -> pl.DataFrame:
    return pl.DataFrame({"run_id": [run, run], "variant": ["baseline", "stage1"], "i2i_map": [0.5, 0.6]})


def _catalog_holder(path: Path, tmp_path: Path, workers: list, seconds: float) -> tuple[int, float]:
    """A process with a read-write connection open: (its pid, wall-clock time it closes it)."""
    proc = worker("catalog", "--path", str(path), "--mode", "hold", "--ready", str(tmp_path / "held"),
                  "--seconds", str(seconds))
    workers.append(proc)
    held = json.loads(Path(wait_for_file(str(tmp_path / "held"), 60, proc)).read_text())
    return held["pid"], held["release_at"]


def test_catalogue_calls_wait_for_a_writer_then_succeed(tmp_path: Path, workers: list):
    path = tmp_path / "catalogue.duckdb"
    catalog = CatalogResource(path=str(path), lock_timeout_s=30)
    catalog.append_report(_report("first"))
    _, release_at = _catalog_holder(path, tmp_path, workers, seconds=2.0)
    assert catalog.history().height == 2  # read-only while a writer holds the file: retried until it lets go
    assert time.time() >= release_at - 0.05  # it could only succeed once the holder let go
    assert catalog.append_report(_report("second")) == 4


def test_catalogue_gives_up_after_the_bound_naming_the_holder(tmp_path: Path, workers: list):
    path = tmp_path / "catalogue.duckdb"
    CatalogResource(path=str(path)).append_report(_report("first"))
    pid, _ = _catalog_holder(path, tmp_path, workers, seconds=3600)
    catalog = CatalogResource(path=str(path), lock_timeout_s=1.0)
    for call in (catalog.history, lambda: catalog.append_report(_report("x"))):
        started = time.monotonic()
        with pytest.raises(CatalogBusyError) as info:
            call()
        assert 1.0 <= time.monotonic() - started < 5
        assert f"PID {pid}" in str(info.value) and "lock_timeout_s" in str(info.value)


def test_catalogue_readers_and_a_writer_in_parallel_processes(tmp_path: Path, workers: list):
    path = tmp_path / "catalogue.duckdb"
    CatalogResource(path=str(path)).append_report(_report("seed"))
    common = ["--path", str(path), "--timeout", "60", "--go", str(tmp_path / "go")]
    writer = worker("catalog", *common, "--mode", "append", "--count", "15", "--ready", str(tmp_path / "w"))
    readers = [worker("catalog", *common, "--mode", "read", "--count", "25", "--ready", str(tmp_path / f"r{n}"))
               for n in range(2)]
    workers += [writer, *readers]
    for name, proc in zip(("w", "r0", "r1"), (writer, *readers)):
        wait_for_file(str(tmp_path / name), 60, proc)
    (tmp_path / "go").touch()
    written = worker_json(writer)["results"]
    reads = [worker_json(reader)["results"] for reader in readers]
    assert written == [2 + 2 * n for n in range(1, 16)]  # every append landed, in order
    for seen in reads:
        assert len(seen) == 25 and all(value % 2 == 0 and 2 <= value <= 32 for value in seen)
        assert seen == sorted(seen)  # a reader never sees the table shrink or a half-appended report
    assert CatalogResource(path=str(path)).history().height == 32
