"""benchmarks/_scale.py: the growth exponent fit and the per-child peak RSS the scale tables are built on."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from benchmarks._scale import fit_exponent, growth_rows, run_child


def test_fit_exponent_recovers_a_power_law():
    sizes = [1_000, 10_000, 100_000]
    assert fit_exponent(sizes, [3e-4 * n ** 1.5 for n in sizes]) == pytest.approx(1.5)
    assert fit_exponent(sizes, [2.0 * n * math.log(n) for n in sizes]) == pytest.approx(1.0 + 1 / math.log(10 ** 3.5),
                                                                                        abs=0.05)
    with pytest.raises(ValueError, match="two sizes"):
        fit_exponent([10], [1.0])


def test_run_child_reports_the_childs_own_peak_rss_and_step_time(tmp_path: Path):
    script = tmp_path / "alloc.py"
    script.write_text(textwrap.dedent("""
        import argparse, sys
        sys.path.insert(0, %r)
        from benchmarks._scale import child_result
        ap = argparse.ArgumentParser(); ap.add_argument("--child"); ap.add_argument("--n", type=int)
        args = ap.parse_args()
        block = bytearray(args.n * 1024 * 1024)  # N MiB, touched
        for i in range(0, len(block), 4096):
            block[i] = 1
        child_result(0.25 if args.child == "alloc" else -1)
    """ % str(Path(__file__).resolve().parents[2])))
    small, large = run_child(script, "alloc", 16), run_child(script, "alloc", 256)
    assert small.seconds == 0.25 and large.n == 256
    assert 200 < large.peak_rss_mib - small.peak_rss_mib < 300
    [row] = growth_rows({"alloc": [small, large]})
    assert row[0] == "alloc" and float(row[-1]) > 2  # memory grows with N: the ratio says so
    with pytest.raises(RuntimeError, match="exited with"):
        run_child(script, "alloc", -1)
