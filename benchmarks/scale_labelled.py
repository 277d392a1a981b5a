"""Scale simulation of the labelled-image path: ingest, splits, stage 1 and evaluation at 10⁴–10⁵ images.

    python benchmarks/scale_labelled.py                       # 10k, 30k, 100k images (docs/scaling.md)
    python benchmarks/scale_labelled.py --sizes 2000 6000     # a quick look
    python benchmarks/scale_labelled.py --map-n 20000         # size of the old-vs-new mAP measurement

Data: synthetic labelled PNGs, 24–40 px, ``--per-class`` images per class (default 5, so 2·10⁴ classes at
10⁵), each distinct (class colour plus per-image noise), written once per size under ``--work`` as
``<label>/<n>.png`` folders. Each step runs in its own process (:mod:`benchmarks._scale`), reading what the
step before it wrote:

* ``ingest``: :func:`clipopt_core.data.manifest.scan_source` + :func:`~clipopt_core.data.manifest.ingest`;
* ``splits``: :func:`~clipopt_core.data.manifest.split_by_class` (10% val, 20% test classes);
* ``stage1``: :func:`clipopt_core.train.runner.train_retrieval`, 1 epoch of the tiny model ``clipopt-tiny``,
  validated on the bounded subset (``val_max_images``) every 50 steps;
* ``evaluation``: :func:`clipopt_core.evaluate.protocol.evaluate_model` of the base model on the test split
  (3 prompt templates, no caption pairs).

The last table is the same run's micro-measurement of I2I mAP at ``--map-n`` random embeddings: the former
full sort of every [1024, N] block (kept below as the reference) against the sort-free
:func:`clipopt_core.evaluate.metrics.image_to_image_ap`; both give the same values (checked), the ratio is
old seconds / new seconds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks._scale import Measurement, child_result, print_growth, run_child  # noqa: E402

STEPS = ("ingest", "splits", "stage1", "evaluation")
MODEL = "clipopt-tiny"


def write_images(folder: Path, n: int, per_class: int, seed: int = 0) -> None:
    """``n`` distinct small PNGs in ``folder/<label>/<i>.png`` (``per_class`` per label); skipped when present."""
    from PIL import Image

    done = folder / f".complete-{n}"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = f"c{i // per_class:06d}"
        side = int(rng.integers(24, 41))
        colour = np.frombuffer(label.encode()[-3:], dtype=np.uint8).astype(np.int16) * 2
        pixels = np.clip(colour + rng.integers(-40, 41, (side, side, 3)), 0, 255).astype(np.uint8)
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / label / f"{i}.png")
    done.touch()


def child(step: str, n: int, work: Path) -> None:
    """Run one step at one size in this process and print its ``SCALE`` line."""
    from clipopt_core.data import manifest as mf

    images, cache = work / f"images-{n}", work / "cache"
    manifest_path, splits_path = work / f"manifest-{n}.parquet", work / f"splits-{n}.parquet"
    started = time.perf_counter()
    if step == "ingest":
        accepted = mf.ingest(mf.source_root(str(images)), mf.scan_source(str(images))).accepted
        accepted.write_parquet(manifest_path)
    elif step == "splits":
        mf.split_by_class(pl.read_parquet(manifest_path), val_fraction=0.1, test_fraction=0.2, seed=0).write_parquet(
            splits_path)
    elif step == "stage1":
        from clipopt_core.models.loading import ModelSpec
        from clipopt_core.train.config import RetrievalConfig, TrainConfig
        from clipopt_core.train.runner import train_retrieval

        config = RetrievalConfig(train=TrainConfig(epochs=1, batch_size=128, precision="fp32"))
        with tempfile.TemporaryDirectory(dir=work) as folder:
            train_retrieval(ModelSpec(MODEL), pl.read_parquet(splits_path), config, Path(folder), cache_dir=cache,
                            stage="retrieval_encoder")
    elif step == "evaluation":
        from clipopt_core.evaluate.protocol import EvalConfig, evaluate_model
        from clipopt_core.models.loading import ModelSpec, load_model

        test = pl.read_parquet(splits_path).filter(pl.col("split") == "test")
        config = EvalConfig(templates=("a photo of a {}.", "{}", "a drawing of a {}."))
        evaluate_model(load_model(ModelSpec(MODEL), cache_dir=cache), test, config)
    else:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    child_result(time.perf_counter() - started)


def reference_ap(x: torch.Tensor, y: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """The former I2I AP (query included): a full stable sort of every [chunk_size, N] similarity block."""
    n = x.shape[0]
    _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    ap = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        order = torch.sort(x[s:e] @ x.T, dim=1, descending=True, stable=True).indices
        rel = inv[order] == inv[s:e, None]
        hits = rel.cumsum(dim=1, dtype=torch.int32)
        r, c = rel.nonzero(as_tuple=True)
        ap[s:e] = torch.zeros(e - s, dtype=torch.float64).index_add_(0, r, hits[r, c].double() / (c + 1).double())
    return ap / counts[inv].double()


def map_old_vs_new(n: int, per_class: int, dim: int = 64) -> None:
    """Old (full sort) vs new (sort-free) I2I AP on the same random embeddings; prints a table and RATIO line."""
    from clipopt_core.evaluate.metrics import image_to_image_ap

    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    y = torch.arange(n) // per_class
    started = time.perf_counter()
    old = reference_ap(x, y)
    old_s = time.perf_counter() - started
    started = time.perf_counter()
    new = image_to_image_ap(x, y)
    new_s = time.perf_counter() - started
    if not torch.equal(old, new):
        raise SystemExit(f"the two mAP implementations disagree: max |diff| {float((old - new).abs().max())}")
    print(f"\n| I2I mAP at N={n:,} | old full sort s | new s | old/new |\n|---|---|---|---|\n"
          f"| same values (checked) | {old_s:.2f} | {new_s:.2f} | {old_s / new_s:.2f} |")
    print(f"RATIO map_old_over_new={old_s / new_s:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--map-n", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=None, help="folder for images and step outputs (kept)")
    parser.add_argument("--child", choices=STEPS)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "clipopt-scale-labelled"
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.n, work)
        return
    rows: dict[str, list[Measurement]] = {step: [] for step in STEPS}
    for n in args.sizes:
        started = time.perf_counter()
        write_images(work / f"images-{n}", n, args.per_class)
        print(f"# {n:,} images written in {time.perf_counter() - started:.0f}s", flush=True)
        for step in STEPS:
            rows[step].append(run_child(__file__, step, n, ["--work", str(work)]))
            print(f"# {step} at {n:,}: {rows[step][-1]}", flush=True)
    print_growth(args.sizes, rows)
    map_old_vs_new(args.map_n, args.per_class)


if __name__ == "__main__":
    main()
