"""scripts/test.sh (the README's test command) refuses to start on a nearly full disk, naming the folder and the fix."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(tmp_path: Path, min_free_gib: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "CLIPOPT_TEST_MIN_FREE_GIB": str(min_free_gib)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_disk_without_room_for_the_suite_stops_it_before_pytest(tmp_path: Path) -> None:
    refused = run_script(tmp_path, 10**9)  # more than any disk holds
    assert refused.returncode == 2, refused.stderr
    assert f"free in {tmp_path}" in refused.stderr and "TMPDIR" in refused.stderr
    assert "pytest" not in refused.stdout


def test_enough_room_runs_pytest_with_the_arguments(tmp_path: Path) -> None:
    allowed = run_script(tmp_path, 0)
    assert allowed.returncode == 0, allowed.stderr
    assert "pytest" in allowed.stdout + allowed.stderr
