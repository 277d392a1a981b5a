"""Reliability-test helpers: asset materialisation on tiny data, failure texts, process control.

The real S3 server fixtures (``s3_server``, ``s3``) are the system tests' own, imported here.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Iterable

import dagster as dg
import pytest
import torch
from torch import nn

from clipopt_core.train.config import TrainConfig
from tests.pipeline.conftest import TINY_TRAIN, tiny_resources, tiny_run_config
from tests.system.conftest import s3, s3_server, wait_for  # noqa: F401  (fixtures re-exported)

REPO = Path(__file__).resolve().parents[2]
DATA_ASSETS = ("raw_images", "image_manifest")
TRAIN_ASSETS = ("raw_images", "image_manifest", "image_splits", "base_model", "retrieval_encoder")
# Slow enough to be killed / raced mid-run (~160 optimizer steps, ~3-5 s on one core), checkpoints every 8 steps.
SLOW_TRAIN = {**TINY_TRAIN, "epochs": 20, "batch_size": 4, "eval_every_steps": 1000, "checkpoint_every_steps": 8,
              "patience": 1000, "validate_at_start": False}


def assets_named(*names: str) -> list:
    from clipopt_dagster.definitions import ASSETS

    selected = [asset for asset in ASSETS if asset.key.to_user_string() in names]
    assert len(selected) == len(names), f"unknown asset among {names}"
    return selected


def run_config_for(names: tuple[str, ...] | list[str], **overrides: dict) -> dict:
    """The tiny run config restricted to the ops of ``names`` (plus ``overrides``)."""
    ops = {key: value for key, value in tiny_run_config()["ops"].items() if key in names}
    ops.update(overrides)
    return {"ops": ops}


def materialize(names: tuple[str, ...] | list[str], tmp: Path, images: Path, *, ops: dict | None = None,
                store_url: str | None = None, raise_on_error: bool = False, **store_options: str) -> dg.ExecuteInProcessResult:
    """``dg.materialize`` of the named assets with the tiny resources under ``tmp``."""
    return dg.materialize(assets_named(*names), resources=tiny_resources(tmp, images, None, store_url, **store_options),
                          run_config=run_config_for(names, **(ops or {})), raise_on_error=raise_on_error)


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Every step-failure message of a run, causes included, as one string."""
    parts = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None:
            parts.append(f"{error.cls_name}: {error.message}")
            error = error.cause or getattr(error, "context", None)
    return "\n".join(parts)


def metadata(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    return {key: value.value for key, value in result.asset_materializations_for_node(node)[0].metadata.items()}


def worker(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start ``python -m tests.reliability._workers ARGS`` in its own session (killable as a group)."""
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                   **(env or {})}
    command = [sys.executable, "-m", "tests.reliability._workers", *args]
    if log is None:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=out,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen]]:
    """Workers started by a test are killed (by their own pid group) when it ends, whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill_group(proc)


def wait_for_file(pattern: str, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.02) -> str:
    """First path matching glob ``pattern``; fails if ``proc`` exits first or after ``timeout`` seconds."""
    def died() -> str | None:
        return f"worker exited with {proc.returncode} first" if proc is not None and proc.poll() is not None else None
    return wait_for(lambda: sorted(glob.glob(pattern)), timeout, pattern, interval=interval, alive=died)[0]


def worker_json(proc: subprocess.Popen, timeout: float = 120) -> dict[str, Any]:
    """The JSON line a worker prints last (waits for it to exit)."""
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert lines, f"worker printed no result (exit {proc.returncode})"
    return json.loads(lines[-1])


class ToyTask:
    """A linear regression with seeded batches: enough for fit's checkpoint / resume logic."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.modules = nn.ModuleDict({"model": nn.Linear(4, 2)})
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(64, 4, generator=generator), torch.randn(64, 2, generator=generator)

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return [{"params": list(self.modules.parameters()), "lr": config.lr, "weight_decay": config.weight_decay}]

    def steps_per_epoch(self, config: TrainConfig) -> int:
        return 64 // config.batch_size

    def batches(self, config: TrainConfig, epoch: int, start_step: int) -> Iterable[torch.Tensor]:
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for step in range(start_step, self.steps_per_epoch(config)):
            yield order[step * config.batch_size:(step + 1) * config.batch_size]

    def train_mode(self) -> None:
        self.modules.train()

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return nn.functional.mse_loss(self.modules["model"](self.x[batch]), self.y[batch]), {}

    def validate(self) -> float:
        return -float(nn.functional.mse_loss(self.modules["model"](self.x), self.y))
