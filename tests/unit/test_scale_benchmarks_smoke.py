"""The scale simulations of docs/scaling.md run end to end at tiny sizes (no timing asserted, only the table)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = {
    "scale_labelled": ["--sizes", "120", "240", "--per-class", "4", "--map-n", "300"],
    "scale_arcmargin": ["--classes", "100", "1000", "--batches", "16", "--repeats", "1"],
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_scale_simulation_prints_its_growth_table(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "CLIPOPT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *RUNS[script]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("| step |") and "b (time)" in line for line in lines), done.stdout[-2000:]
    assert any(line.startswith("RATIO ") and "max_rss_growth=" in line for line in lines), done.stdout[-2000:]
