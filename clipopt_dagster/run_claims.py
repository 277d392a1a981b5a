"""Crashed runs release their pool slots: the daemon-less path (``dg launch``, ``dagster asset materialize``).

A run killed with SIGKILL (OOM killer, lost node, Ctrl-\\) never reports its end: it stays STARTED and
keeps its ``clipopt_gpu`` pool slot, so every later run logs "blocked by limit" forever. With a daemon,
run monitoring (instance profiles) fails such runs; without one, :func:`releasing_in_process_executor`
(the code location's executor) does it at the start of the next run:

1. it tags its own run with ``clipopt/pid`` and ``clipopt/host`` (this process);
2. for every pool, each run holding a slot whose tags name this host and a process that no longer
   exists is reported failed and its slots are freed, with a warning naming run, pid and pool.

Runs on other hosts, or without the tags, are left to run monitoring. A pid reused by an unrelated
process keeps its claim (conservative: never frees a live run's slot).

It also creates the plan's pools (at the instance's default limit) before any step claims a slot: Dagster
creates a pool on its first claim, and on Postgres two runs doing that at the same moment make one of
them fail (a unique-key violation aborts the transaction its fallback update then uses).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import dagster as dg

PID_TAG, HOST_TAG = "clipopt/pid", "clipopt/host"
LIVE = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING)


def process_exists(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_holder(run: dg.DagsterRun | None, host: str) -> int | None:
    """The pid of ``run``'s process when that run is live by status but its process on ``host`` is gone."""
    if run is None or run.status not in LIVE or run.tags.get(HOST_TAG) != host or PID_TAG not in run.tags:
        return None
    pid = int(run.tags[PID_TAG])
    return None if process_exists(pid) else pid


def initialise_pools(instance: dg.DagsterInstance, pools: set[str]) -> None:
    """Create the rows of ``pools`` not yet known to the instance; a concurrent creator winning is fine."""
    from sqlalchemy.exc import DBAPIError

    storage = instance.event_log_storage
    for pool in sorted(pools - set(storage.get_concurrency_keys())):
        try:
            storage.initialize_concurrency_limit_to_default(pool)
        except DBAPIError:
            if pool not in storage.get_concurrency_keys():  # not the other run's insert: a real error
                raise


def release_dead_claims(instance: dg.DagsterInstance, current_run_id: str, log: Any) -> list[str]:
    """Fail the runs whose process is gone and free their pool slots; returns their run ids."""
    host, released = socket.gethostname(), []
    storage = instance.event_log_storage
    for pool in sorted(storage.get_concurrency_keys()):
        for claim in storage.get_concurrency_info(pool).claimed_slots:
            if claim.run_id == current_run_id or claim.run_id in released:
                continue
            run = instance.get_run_by_id(claim.run_id)
            pid = dead_holder(run, host)
            if pid is None:
                continue
            instance.report_run_failed(run, f"process {pid} on {host} is gone; failed by run {current_run_id}")
            storage.free_concurrency_slots_for_run(claim.run_id)
            log.warning(f"freed the {pool} pool slot(s) of run {claim.run_id}: its process {pid} on {host} is gone "
                        "(killed); the run is marked failed")
            released.append(claim.run_id)
    return released


class ReleasingExecutor(dg.Executor):
    """The in-process executor, after :func:`release_dead_claims` and tagging this run with its pid and host."""

    def __init__(self, inner: dg.Executor) -> None:
        self._inner = inner

    @property
    def retries(self):  # noqa: ANN201 - dagster's RetryMode
        return self._inner.retries

    @property
    def step_dependency_config(self):  # noqa: ANN201 - dagster's StepDependencyConfig
        return self._inner.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[dg.DagsterEvent]:
        instance, run_id = plan_context.instance, plan_context.run_id
        instance.add_run_tags(run_id, {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
        release_dead_claims(instance, run_id, plan_context.log)
        initialise_pools(instance, {step.pool for step in execution_plan.step_dict.values() if step.pool})
        yield from self._inner.execute(plan_context, execution_plan)


@dg.executor(name="in_process", config_schema=dg.in_process_executor.config_schema)
def releasing_in_process_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """``dg.in_process_executor`` (same config) that first frees pool slots of killed runs on this host."""
    return ReleasingExecutor(dg.in_process_executor.executor_creation_fn(init_context))
