"""Benchmark the default (auto) ANN index against exact flat search on random unit vectors.

    python benchmarks/index_recall.py                # 100k x 512 (acceptance: recall@10 >= 0.95)
    python benchmarks/index_recall.py --smoke        # tiny sizes (auto picks flat there)
    python benchmarks/index_recall.py --smoke --kind ivf_flat
    python benchmarks/index_recall.py --clusters 1000   # clustered data, closer to real embeddings

Random-normal vectors are a worst case for ANN (no cluster structure), so the speedup here is a
lower bound for real embeddings. Recall@10 is measured on a query sample different from the one
used to tune nprobe, excluding each query's own id. Queries/s use fresh random queries, as one
batch and one at a time. The reference is exact flat search over the same vectors; it leaves out
nothing of the search, but pays no training (``build_s``) and has recall 1. Ratios are seconds per
query of the chosen index / flat's (``index_vs_flat_batch``: flat uses BLAS over the whole batch;
``index_vs_flat_single``: latency-bound serving), lower is better; ``recall_at_10`` is a fraction,
higher is better (target >= 0.95).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipopt_core.serve.index import IndexSpec, build_index, recall_at_k_vs_exact, search  # noqa: E402


def unit_normal(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``[n, dim]`` float32 random-normal rows, L2-normalised."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int, noise: float = 1.0) -> np.ndarray:
    """``[n, dim]`` unit rows around ``clusters`` random unit centres (cos to centre ~ 1/sqrt(1+noise^2))."""
    centres = unit_normal(rng, clusters, dim)
    x = centres[rng.integers(0, clusters, n)] + noise * unit_normal(rng, n, dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def queries_per_second(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` throughput searching ``queries [Q, D]`` as one batch."""
    search(index, queries[: min(16, len(queries))], k)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(index, queries, k)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def single_query_qps(index: faiss.Index, queries: np.ndarray, k: int, n: int = 100) -> float:
    """Throughput searching the first ``n`` queries one at a time (latency-bound serving)."""
    qs = queries[:n]
    t0 = time.perf_counter()
    for i in range(len(qs)):
        search(index, qs[i : i + 1], k)
    return len(qs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (n=5000, dim=32, 200 queries)")
    ap.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clusters", type=int, default=0,
                    help="0: isotropic random-normal data (default, ANN worst case); C>0: C noisy clusters")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.dim, args.queries = 5000, 32, 200

    rng = np.random.default_rng(args.seed)
    if args.clusters:
        both = clustered(rng, args.n + args.queries, args.dim, args.clusters)
        x, q = both[: args.n], both[args.n :]
    else:
        x, q = unit_normal(rng, args.n, args.dim), unit_normal(rng, args.queries, args.dim)
    print(f"n={args.n} dim={args.dim} clusters={args.clusters} queries={args.queries} k={args.k} "
          f"faiss_threads={faiss.omp_get_max_threads()}")

    index, info = build_index(x, IndexSpec(kind=args.kind), seed=args.seed)
    rec = recall_at_k_vs_exact(index, x, k=args.k, sample=min(1000, args.n), seed=args.seed + 1)
    qps, qps1 = queries_per_second(index, q, args.k), single_query_qps(index, q, args.k)

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    flat_build = time.perf_counter() - t0
    flat_qps, flat_qps1 = queries_per_second(flat, q, args.k), single_query_qps(flat, q, args.k)

    rows = [
        (info["kind"], info["build_seconds"], info["bytes"], info["nlist"], info["nprobe"] or info["ef_search"], rec, qps, qps1),
        ("flat(exact)", flat_build, flat.ntotal * flat.code_size, None, None, 1.0, flat_qps, flat_qps1),
    ]
    header = f"{'index':<12} {'build_s':>8} {'bytes':>12} {'nlist':>6} {'nprobe':>7} {'recall@10':>10} {'q/s batch':>10} {'q/s single':>10}"
    print(header)
    print("-" * len(header))
    for kind, build_s, nbytes, nlist, nprobe, r, qs, qs1 in rows:
        print(f"{kind:<12} {build_s:>8.2f} {nbytes:>12,d} {str(nlist or '-'):>6} {str(nprobe or '-'):>7} "
              f"{r:>10.4f} {qs:>10.0f} {qs1:>10.0f}")
    print(f"tuned_recall={info['tuned_recall']}  train_size={info['train_size']}  target_met={info['target_met']}")
    print("ratios: seconds per query, index / flat (lower is better); recall_at_10 (higher is better)")
    print(f"RATIO index_vs_flat_batch={flat_qps / qps:.3f} index_vs_flat_single={flat_qps1 / qps1:.3f} "
          f"recall_at_10={rec:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
