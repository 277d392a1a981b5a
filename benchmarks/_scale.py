"""Shared harness of the ``benchmarks/scale_*.py`` simulations: one step at one size per child process.

A scale script runs each (step, N) in a fresh ``python benchmarks/<script>.py --child STEP --n N`` process
so that the peak RSS of the step is its own: the child reports its ``VmHWM`` (the high-water mark of its
address space, which starts afresh at ``exec``; ``ru_maxrss`` would keep the parent's peak across the
fork). The parent prints one row per step with the wall time
and peak RSS at each size, the time exponent ``b`` fitted by least squares on log t = a + b log N over
all sizes, and the RSS growth ratio ``peak(N_max) / peak(N_min)`` (≈ 1 means memory is flat in N).

Usage in a script::

    from benchmarks._scale import Measurement, growth_rows, print_growth, run_child

    rows = {step: [run_child(__file__, step, n, extra) for n in sizes] for step in steps}
    print_growth(sizes, rows)

The child reports its own wall time (the step only, without interpreter start-up and imports) and its
peak RSS on its last stdout line, ``SCALE seconds=<float> peak_rss_mib=<float>`` (:func:`child_result`).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Measurement:
    """One step at one size: ``seconds`` of the step itself and ``peak_rss_mib`` of its whole process."""

    n: int
    seconds: float
    peak_rss_mib: float


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM`` of /proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def child_result(seconds: float) -> None:
    """The child's last stdout line, read by :func:`run_child`: step seconds and peak RSS."""
    print(f"SCALE seconds={seconds:.4f} peak_rss_mib={peak_rss_mib():.1f}", flush=True)


def run_child(script: str | Path, step: str, n: int, extra: Sequence[str] = (),
              env: dict[str, str] | None = None) -> Measurement:
    """Run ``script --child step --n n *extra`` in a new process; its step time and peak RSS (MiB)."""
    command = [sys.executable, str(script), "--child", step, "--n", str(n), *extra]
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{output[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("SCALE ")]
    if not lines:
        raise RuntimeError(f"{' '.join(command)} printed no 'SCALE' line:\n{output[-3000:]}")
    fields = dict(item.split("=", 1) for item in lines[-1].split()[1:])
    return Measurement(n, float(fields["seconds"]), float(fields["peak_rss_mib"]))


def fit_exponent(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope ``b`` of log(value) against log(size): value ∝ size^b."""
    if len(sizes) < 2:
        raise ValueError("fitting a growth exponent needs at least two sizes")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(v, 1e-9)) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def growth_rows(measurements: dict[str, list[Measurement]]) -> list[list[object]]:
    """One row per step: seconds and peak MiB per size, time exponent b, RSS ratio largest/smallest size."""
    rows = []
    for step, points in measurements.items():
        sizes = [p.n for p in points]
        b = fit_exponent(sizes, [p.seconds for p in points])
        rss_ratio = points[-1].peak_rss_mib / points[0].peak_rss_mib
        rows.append([step, *(f"{p.seconds:.2f}" for p in points), *(f"{p.peak_rss_mib:.0f}" for p in points),
                     f"{b:.2f}", f"{rss_ratio:.2f}"])
    return rows


def print_growth(sizes: Sequence[int], measurements: dict[str, list[Measurement]]) -> None:
    """Print the markdown table of :func:`growth_rows` (pasted into docs/scaling.md) and a RATIO line."""
    headers = ["step", *(f"{n:,} s" for n in sizes), *(f"{n:,} MiB" for n in sizes), "b (time)", "RSS ratio"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in growth_rows(measurements):
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    worst = max(points[-1].peak_rss_mib / points[0].peak_rss_mib for points in measurements.values())
    print(f"RATIO max_rss_growth={worst:.3f}", flush=True)
