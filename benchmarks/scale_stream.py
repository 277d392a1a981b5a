"""Streamed caption corpora at scale: shard ingest, mining and realignment over 10⁴–10⁶ pairs in tar shards.

    python benchmarks/scale_stream.py --smoke                           # 2e3, 4e3 pairs (about a minute)
    python benchmarks/scale_stream.py                                   # 1e4, 1e5, 1e6 (hours on 2 shared vCPU)
    python benchmarks/scale_stream.py --steps realign mining          # without the ingest step

Data: a synthetic webdataset corpus per size N under ``--data`` (default: the system temp folder), in
shards of 10,000 samples: ``<key>.png`` (a random 4×4 colour pattern scaled to 20 px; 10⁵ distinct patterns,
reused beyond) + ``<key>.txt`` (a distinct ~60-character caption). Generated once and reused.

Steps, each in its own process (:mod:`benchmarks._scale`: wall time of the step, the process's peak RSS):

* ``ingest``: :func:`clipopt_core.data.caption_shards.read_caption_shards` (stream, decode, hash every
  sample), writes the pairs table the other steps read (as ``caption_corpus`` would); without this
  step the table is listed from the shards before the first timed step (no decoding).
* ``realign``: :func:`clipopt_core.train.runner.train_realign` on the N pairs, scanned lazily from the pairs
  table as a training run reads them (never collected whole), with the tiny model, one
  epoch at ``--batch`` pairs per step (the method's 32,768 needs a [B, B] logit matrix of 4 GiB on the CPU),
  from an empty embedding cache: every image embedded once into the disk cache, then the epoch
  streamed from it.
* ``mining``: :func:`clipopt_core.train.mining.mine_captions` for ``--images`` images against a pool of
  the N captions, read from ``pairs.parquet`` in chunks and embedded and searched ``chunk_size`` texts at
  a time (the kept captions' texts read back at the end).

The table printed at the end (pasted into docs/scaling.md) gives seconds and peak MiB per size, the
time exponent b and the RSS ratio largest/smallest size (≈ 1: memory flat in N).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import io
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._scale import Measurement, child_result, print_growth, run_child  # noqa: E402

SHARD_SAMPLES = 10_000
PATTERNS = 100_000
STEPS = ("ingest", "realign", "mining")
WORDS = ("red", "amber", "teal", "violet", "ochre", "slate", "olive", "coral")
NOUNS = ("kite", "harbour", "lantern", "meadow", "bicycle", "glacier", "market", "violin")


def corpus_dir(data: Path, n: int) -> Path:
    return data / f"pairs-{n}"


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` samples (PNG + caption) in shards of :data:`SHARD_SAMPLES`, written once (temp + rename).

    Sample i's image is pattern ``i mod PATTERNS``: distinct images up to 10⁵ samples, then reused (encoding
    10⁶ PNGs would take longer than the run on a shared CPU); every pair is still read and decoded on its own.
    """
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns: list[bytes] = []
    for shard, start in enumerate(range(0, n, SHARD_SAMPLES)):
        staging = folder / f"shard-{shard:05d}.tar.tmp"
        with tarfile.open(staging, "w") as tar:
            for number in range(start, min(n, start + SHARD_SAMPLES)):
                if number < PATTERNS:
                    pattern = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((20, 20), Image.NEAREST)
                    buffer = io.BytesIO()
                    pattern.save(buffer, format="PNG")
                    patterns.append(buffer.getvalue())
                caption = (f"a photo of a {WORDS[number % 8]} {NOUNS[(number // 8) % 8]} "
                           f"seen from afar, sample number {number}")
                for ext, data in (("png", patterns[number % PATTERNS]), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{number:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        staging.rename(folder / f"shard-{shard:05d}.tar")
    (folder / "done").write_text(str(n))


def child(step: str, n: int, args: argparse.Namespace) -> None:
    """Run one step at size ``n`` in this process and print its ``SCALE`` line."""
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    folder = corpus_dir(Path(args.data), n)
    pairs_file = folder / "pairs.parquet"
    if step == "ingest":
        from clipopt_core.data.caption_shards import read_caption_shards

        start = time.perf_counter()
        pairs, rejected = read_caption_shards(str(folder))
        seconds = time.perf_counter() - start
        assert pairs.height == n and rejected.height == 0, (pairs.height, rejected.height)
        pairs.write_parquet(pairs_file)
    elif step == "realign":
        seconds = _realign(pairs_file, folder, args)
    else:
        seconds = _mining(pairs_file, args)
    child_result(seconds)


def list_pairs(folder: Path) -> Path:
    """The corpus's pairs table (``uri``, ``caption``, ``sha256``) as ``caption_corpus`` would store it, listed
    from the shards without decoding the images (in the parent: the ``ingest`` step measures the real ingest)."""
    from clipopt_core.data.tar_shards import iter_shards, member_uri

    pairs_file = folder / "pairs.parquet"
    if not pairs_file.exists():
        rows = [(member_uri(s, "png"), s["txt"].decode(), hashlib.sha256(s["png"]).hexdigest()) for s in iter_shards(str(folder))]
        staging = pairs_file.with_suffix(".parquet.tmp")
        pl.DataFrame(rows, schema=["uri", "caption", "sha256"], orient="row").write_parquet(staging)
        staging.rename(pairs_file)
    return pairs_file


def _realign(pairs_file: Path, folder: Path, args: argparse.Namespace) -> float:
    """One realignment epoch over the pairs table, scanned lazily as a training run reads it
    (:func:`clipopt_core.train.job.load_inputs`), from an empty cache (a fresh work and cache folder)."""
    from clipopt_core.models.loading import ModelSpec
    from clipopt_core.train.config import REALIGN_TRAIN_DEFAULTS, RealignConfig
    from clipopt_core.runtime.digest import frame_rows
    from clipopt_core.train.runner import train_realign

    train = replace(REALIGN_TRAIN_DEFAULTS, epochs=1, batch_size=args.batch, precision="fp32",
                    eval_every_steps=10**9, checkpoint_every_steps=10**9, validate_at_start=False)
    pairs = pl.scan_parquet(pairs_file)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        start = time.perf_counter()
        output = train_realign(ModelSpec("clipopt-tiny"), pairs, pl.read_parquet(pairs_file, n_rows=256),
                               RealignConfig(train=train), Path(work) / "run", cache_dir=Path(work) / "cache",
                               stage="realigned_2sft")
        seconds = time.perf_counter() - start
    assert output.fit.steps == -(-frame_rows(pairs) // args.batch), output.fit.steps
    return seconds


def _mining(pairs_file: Path, args: argparse.Namespace) -> float:
    """Mine ``--images`` images against the pool of every caption in the corpus, read from the pairs
    parquet in chunks (:class:`ParquetPool`, column ``caption``; :func:`generate` writes distinct,
    whitespace-normalised captions, so the file is a valid pool as it is)."""
    from clipopt_core.models.loading import ModelSpec, load_model
    from clipopt_core.train.config import MiningConfig
    from clipopt_core.train.mining import mine_captions
    from clipopt_core.train.text_pool import ParquetPool

    images = pl.read_parquet(pairs_file, n_rows=args.images).select(
        "uri", pl.col("sha256").str.slice(0, 20).alias("image_id"))
    with tempfile.TemporaryDirectory(dir=pairs_file.parent) as cache:
        bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=Path(cache))
    start = time.perf_counter()
    with ParquetPool(pairs_file, "caption") as pool:
        table, stats = mine_captions(bundle, images, pool, MiningConfig(threshold=None))
    seconds = time.perf_counter() - start
    assert stats["pool_size"] == len(pool) and table.height > 0
    return seconds


def _load_results(path: str | None) -> dict[tuple[str, int], Measurement]:
    if not path or not Path(path).exists():
        return {}
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {(r["step"], r["n"]): Measurement(r["n"], r["seconds"], r["peak_rss_mib"]) for r in records}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="corpus sizes (default 10000 100000 1000000)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "clipopt-scale-stream"))
    ap.add_argument("--batch", type=int, default=4096, help="realignment pairs per step")
    ap.add_argument("--images", type=int, default=1000, help="images mined against the pool")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="sizes 2000 4000")
    ap.add_argument("--results", default=None, help="JSON-lines file of measurements: (step, N) found there are "
                                                     "reused, new ones appended (a long run can go on in parts)")
    ap.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.n, args)
        return 0
    sizes = args.sizes or ([2000, 4000] if args.smoke else [10_000, 100_000, 1_000_000])
    steps = [step for step in STEPS if step in args.steps]
    extra = ["--data", args.data, "--batch", str(args.batch), "--images", str(args.images), "--threads", str(args.threads)]
    known = _load_results(args.results)
    rows: dict[str, list[Measurement]] = {step: [] for step in steps}
    for n in sizes:
        if all((step, n) in known for step in steps):
            for step in steps:
                rows[step].append(known[step, n])
            continue
        generate(corpus_dir(Path(args.data), n), n)
        list_pairs(corpus_dir(Path(args.data), n))
        for step in steps:
            point = known.get((step, n)) or run_child(__file__, step, n, extra)
            rows[step].append(point)
            if args.results and (step, n) not in known:
                with open(args.results, "a") as handle:
                    handle.write(json.dumps({"step": step, **asdict(point)}) + "\n")
            print(f"{step} n={n}: {point.seconds:.1f} s, peak {point.peak_rss_mib:.0f} MiB", flush=True)
    if len(sizes) > 1:  # one size has no growth to fit: its line above is the result (see --results)
        print_growth(sizes, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
