"""Every benchmark script runs end to end in ``--smoke`` mode and prints its ratio line.

No timing is asserted: the machines are shared and noisy, and smoke sizes say nothing about
speed. Every script ends with a ``RATIO name=value ...`` line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("train_step", "realign_step", "embed_throughput", "caption_mining", "orchestration", "index_recall",
           "scale_stream")
# ratios each script must report (RESULTS.md: every ratio is ours / reference, lower is better, unless named
# as a fraction): the cold first epoch, realignment end to end with the precompute, mining as a guard
REQUIRED = {
    "train_step": {"stage1_vs_bare", "e2e_cold_vs_model_w0", "e2e_warm_vs_model_w0", "loader_cold_vs_model_w0"},
    "realign_step": {"realign_step_vs_text_only", "realign_step_vs_open_clip_train", "realign_e2e1_vs_open_clip_train"},
    "embed_throughput": {"images_vs_bare_w0", "texts_vs_bare"},
    "caption_mining": {"topk_guard_vs_faiss", "peak_vs_chunk_bound", "agreement"},
    "orchestration": {"dagster_vs_direct"},
    "index_recall": {"index_vs_flat_batch", "index_vs_flat_single", "recall_at_10"},
    "scale_stream": {"max_rss_growth"},
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script: str) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RATIO ")]
    assert lines, f"{script} printed no RATIO line:\n{done.stdout[-3000:]}"
    pairs = dict(pair.split("=", 1) for pair in lines[-1].removeprefix("RATIO ").split())
    assert REQUIRED[script] <= set(pairs), f"{script}: missing {REQUIRED[script] - set(pairs)} in {lines[-1]}"
    assert all(float(value) >= 0 for value in pairs.values()), lines[-1]


def test_run_all_lists_every_step_benchmark() -> None:
    """run_all.sh runs the step benchmarks; the scale simulations (``scale_*``, tens of minutes) run on their own."""
    text = (ROOT / "benchmarks" / "run_all.sh").read_text()
    assert all(script in text for script in SCRIPTS if not script.startswith("scale_"))
    assert "scale_" not in text.split("for script in", 1)[1].split(";", 1)[0]
