"""The ``dg`` CLI the README and scripts/demo.sh use: ``dg check defs`` and ``dg launch --job``.

Both run as subprocesses of the installed ``dg`` on a temporary DAGSTER_HOME; neither may print a
superseded-command warning. ``dg launch`` runs ``retraining_job`` on the tiny sources with the
repository's own dagster.yaml (pools on), like the demo does with ``configs/demo.yaml``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import retraining_run_config
from tests.system.conftest import VENV_BIN

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
SUPERSEDED = ("SupersessionWarning", "superseded")


def dg(args: list[str], home: Path, extra_env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": str(VENV_BIN.parent), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run([str(VENV_BIN / "dg"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def test_dg_check_defs_loads_the_project(tmp_path):
    done = dg(["check", "defs"], tmp_path / "home")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "All definitions loaded successfully" in output
    assert not any(word in output for word in SUPERSEDED)


def test_dg_check_defs_fails_on_a_broken_module(tmp_path):
    """The check can fail: a code location that does not import is reported with a non-zero exit."""
    done = dg(["check", "defs"], tmp_path / "home", {"CLIPOPT_LAUNCHER": "pipes_nowhere"})
    assert done.returncode != 0 and "pipes_nowhere" in done.stdout + done.stderr


def test_dg_launch_runs_the_retraining_job_without_a_superseded_warning(tmp_path, shapes_source, caption_source):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(retraining_run_config()))
    env = {"CLIPOPT_IMAGES": str(shapes_source), "CLIPOPT_CAPTIONS": str(caption_source),
           "CLIPOPT_CACHE": str(tmp_path / "cache"), "CLIPOPT_ARTIFACTS": f"file://{tmp_path / 'artifacts'}"}
    done = dg(["launch", "--job", "retraining_job", "-m", "clipopt_dagster.definitions", "-c", str(config)],
              tmp_path / "home", env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "RUN_SUCCESS" in output and not any(word in output for word in SUPERSEDED)
    assert (tmp_path / "artifacts" / "serving" / "index" / "info.json").exists()
