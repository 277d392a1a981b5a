"""Training seeds as a feature: every stage trained under N seeds, one report of mean ± sd per variant.

A seed run publishes its checkpoints under its own store root (:func:`seed_root`), so the served
models under ``models/`` are untouched; the baseline does not depend on the seed and is evaluated once.
"""
from __future__ import annotations

import statistics
from typing import Mapping

import polars as pl

from clipopt_core.evaluate.report import HEADLINE
from clipopt_core.registry import BASELINE, VARIANTS

SEED_SWEEP_PREFIX = "sweeps"


def seed_root(seed: int) -> str:
    """Store folder of one seed's checkpoints (``sweeps/seed-<n>/models``)."""
    return f"{SEED_SWEEP_PREFIX}/seed-{seed}/models"


def seed_summary(baseline: Mapping[str, float], per_seed: Mapping[int, Mapping[str, Mapping[str, float]]]) -> pl.DataFrame:
    """One row per (variant, metric): mean and sample sd over seeds of the value and of its delta to the baseline.

    Args:
        baseline: metric → value of the base model (seed-independent).
        per_seed: seed → variant → metric → value, for the trained variants.
    Returns columns ``variant, metric, seeds, mean, sd, delta_mean, delta_sd, values`` (values in seed order;
    sd is 0.0 for one seed). The baseline's rows have ``seeds`` = 1 and zero deltas.
    """
    seeds = sorted(per_seed)
    rows = [{"variant": BASELINE, "metric": metric, "seeds": 1, "mean": value, "sd": 0.0, "delta_mean": 0.0,
             "delta_sd": 0.0, "values": [value]} for metric, value in baseline.items()]
    for variant in [v for v in VARIANTS if v != BASELINE and all(v in per_seed[s] for s in seeds)]:
        for metric in baseline:
            values = [float(per_seed[seed][variant][metric]) for seed in seeds]
            deltas = [value - baseline[metric] for value in values]
            rows.append({"variant": variant, "metric": metric, "seeds": len(seeds), "mean": statistics.fmean(values),
                         "sd": _sd(values), "delta_mean": statistics.fmean(deltas), "delta_sd": _sd(deltas),
                         "values": values})
    return pl.DataFrame(rows)


def summary_markdown(summary: pl.DataFrame, metrics: tuple[str, ...] | None = None) -> str:
    """Variants × metrics (default: the report's headline columns present, else all), cells
    ``mean ± sd (Δ delta_mean ± delta_sd)``, values ×100 to one decimal."""
    present = tuple(dict.fromkeys(summary["metric"].to_list()))
    metrics = metrics or tuple(m for m in HEADLINE if m in present) or present
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for variant in dict.fromkeys(summary["variant"].to_list()):
        cells = []
        for metric in metrics:
            row = summary.filter((pl.col("variant") == variant) & (pl.col("metric") == metric)).row(0, named=True)
            cell = f"{100 * row['mean']:.1f} ± {100 * row['sd']:.1f}"
            if variant != BASELINE:
                cell += f" ({100 * row['delta_mean']:+.1f} ± {100 * row['delta_sd']:.1f})"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
