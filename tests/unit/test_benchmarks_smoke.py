"""Every benchmark script runs end to end in ``--smoke`` mode and prints its ratio line.

No timing is asserted: the machines are shared and noisy, and smoke sizes say nothing about
speed. ``index_recall.py`` predates the ``RATIO`` convention and ends with ``speedup_vs_flat=``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("train_step", "realign_step", "embed_throughput", "caption_mining", "orchestration", "index_recall")
RATIO_PREFIX = {"index_recall": "speedup_vs_flat="}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script: str) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{script} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    prefix = RATIO_PREFIX.get(script, "RATIO ")
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    assert lines, f"{script} printed no line starting with {prefix!r}:\n{done.stdout[-3000:]}"
    assert all("=" in pair for pair in lines[-1].removeprefix("RATIO ").split()), lines[-1]


def test_run_all_lists_every_script() -> None:
    text = (ROOT / "benchmarks" / "run_all.sh").read_text()
    assert all(script in text for script in SCRIPTS)
