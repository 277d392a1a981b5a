"""``benchmarks/serve_load.py --smoke`` runs end to end: a real ``clipopt serve`` process under load,
every request answered, and the ratio line printed. No timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_smoke() -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--smoke", "--seconds", "0.5",
                           "--clients", "1,4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = [line.split() for line in done.stdout.splitlines() if " via HTTP " in line]
    assert len(rows) == 4 and all(row[-1] == "0" for row in rows), done.stdout  # no failed request
    ratio = [line for line in done.stdout.splitlines() if line.startswith("RATIO ")][-1]
    assert set(pair.split("=")[0] for pair in ratio.split()[1:]) == {"text_1", "text_4", "image_1", "image_4"}
