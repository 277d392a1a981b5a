"""Index build time, memory and recall at scale with the sharded recipe, and an extrapolation to 10^8–10^9.

    python benchmarks/index_scale.py --smoke             # 2e4 x 64 (seconds)
    python benchmarks/index_scale.py                     # 1e5 and 1e6 x 512 (minutes on 2 vCPU)
    python benchmarks/index_scale.py --sizes 100000 --kinds ivf_pq

For each size N: synthetic unit vectors with low intrinsic dimension (a 64-dim Gaussian mixture mapped to
D dims, like real embeddings) split into ``--shards`` shards; :func:`clipopt_core.serve.shards.build_from_shards` trains the
IVF quantiser once on ``train_per_list × nlist`` vectors sampled across shards, adds each shard to a
copy, merges, and tunes nprobe to recall@10 ≥ 0.95 vs exact search (held-out queries, capped at
``--max-nprobe``). IVF-PQ alone cannot reach 0.95 (64-byte codes), so it is also measured with exact
re-ranking of its top 100 (``ivf_pq+rerank``: in a deployment the raw vectors stay on disk). Memory: the
index's own size (codes + ids + centroids) and the process's peak RSS (``ru_maxrss``, includes the
generated data). The extrapolation prints, for the settings chosen for very large galleries (IVF-PQ,
64-byte codes for D=512, nlist ≈ 8·sqrt(N), HNSW quantiser from 65 536 lists, re-ranking from disk), the
RAM/disk sizes and the train/add times scaled from the measured rates — order-of-magnitude figures for
planning, not promises.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipopt_core.serve.index import IndexSpec  # noqa: E402
from clipopt_core.serve.shards import build_from_shards  # noqa: E402


def embeddings_like(n: int, dim: int, seed: int, latent: int = 64, spread: float = 1.0, iso: float = 0.02) -> np.ndarray:
    """``[n, dim]`` float32 unit rows with low intrinsic dimension, like real embeddings.

    A mixture of ``max(10, n // 1000)`` Gaussian clusters in a ``latent``-dim space, mapped to ``dim``
    dims by a random linear map, plus a little isotropic noise; generated in 100k-row blocks.
    """
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((latent, dim), dtype=np.float32) / math.sqrt(latent)
    centres = rng.standard_normal((max(10, n // 1000), latent), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        rows = min(n, start + 100_000) - start
        y = centres[rng.integers(0, len(centres), rows)] + spread * rng.standard_normal((rows, latent), dtype=np.float32)
        block = y @ mixing + iso * rng.standard_normal((rows, dim), dtype=np.float32)
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def reranked_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                    k: int = 10, k_factor: int = 10) -> float:
    """Recall@k after exact re-ranking of the index's top ``k·k_factor`` candidates with the raw vectors."""
    _, candidates = index.search(queries, k * k_factor)
    safe = np.where(candidates < 0, 0, candidates)
    scores = np.einsum("qd,qcd->qc", queries, vectors[safe])
    scores[candidates < 0] = -np.inf
    top = np.take_along_axis(candidates, np.argsort(-scores, axis=1)[:, :k], 1)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top, exact)]))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def pow2_nlist(n: int) -> int:
    return 1 << max(4, round(math.log2(4 * math.sqrt(n))))


def measure(n: int, dim: int, kind: str, shards: int, args: argparse.Namespace) -> list[dict]:
    """Build one index; for IVF-PQ also the re-ranked variant (raw vectors on disk in a deployment)."""
    vectors = embeddings_like(n + 1000, dim, seed=args.seed)
    queries, vectors = vectors[n:], vectors[:n]  # fresh queries from the same distribution
    bounds = np.linspace(0, n, shards + 1).astype(int)
    nlist = args.nlist or pow2_nlist(n)
    spec = IndexSpec(kind=kind, nlist=nlist, pq_m=dim // 8 if kind == "ivf_pq" else None, target_recall=0.95)
    started = time.perf_counter()
    index, info, _ = build_from_shards(lambda s: vectors[bounds[s]:bounds[s + 1]], np.diff(bounds), dim, spec,
                                       seed=args.seed, tune_queries=args.queries, train_per_list=args.train_per_list,
                                       max_nprobe=args.max_nprobe)
    wall = time.perf_counter() - started
    t0 = time.perf_counter()
    index.search(queries, 10)
    row = {**info, "label": kind, "wall_seconds": wall, "qps_batch": len(queries) / (time.perf_counter() - t0),
           "peak_rss_gib": peak_rss_gib(), "bytes_per_vector": info["bytes"] / n}
    if kind != "ivf_pq":
        return [row]
    _, exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    nprobe, recall = 1, 0.0
    while True:  # smallest power-of-two nprobe whose re-ranked recall meets the target
        ivf.nprobe = nprobe
        recall = reranked_recall(index, vectors, queries, exact)
        if recall >= 0.95 or nprobe >= min(args.max_nprobe, nlist):
            break
        nprobe *= 2
    t0 = time.perf_counter()
    reranked_recall(index, vectors, queries, exact)
    rerank = {**row, "label": "ivf_pq+rerank", "nprobe": nprobe, "recall_at_10": recall,
              "qps_batch": len(queries) / (time.perf_counter() - t0)}
    return [row, rerank]


def big_nlist(n: int) -> int:
    """faiss's guideline for very large N: a power of two near 8·sqrt(N) (65 536 at 1e8, 262 144 at 1e9)."""
    return 1 << max(4, round(math.log2(8 * math.sqrt(n))))


def extrapolate(rows: list[dict], dim: int, workers: int, train_per_list: int) -> None:
    """Index size and rough train/add times for 1e7..1e9 vectors with the large-gallery settings."""
    pq = [r for r in rows if r["label"] == "ivf_pq"] or rows
    ref = max(pq, key=lambda r: r["n"])
    add_rate = ref["n"] / max(ref["add_seconds"], 1e-9)  # vectors/s with ref's flat quantiser, this machine
    train_rate = ref["train_size"] * ref["nlist"] / max(ref["train_seconds"], 1e-9)  # (vectors x lists)/s
    m = dim // 8
    print(f"\n# extrapolation: IVF-PQ m={m} x 8 bit in RAM + raw vectors as fp16 on disk for re-ranking the top 100; "
          f"rates from N={ref['n']:,} {ref['label']} here: add {add_rate:,.0f} vec/s, "
          f"k-means {train_rate:.3g} vec*lists/s ({faiss.omp_get_max_threads()} threads)")
    header = (f"{'N':>14} {'factory':<26} {'train_vecs':>11} {'RAM_GiB':>8} {'RAM/worker':>10} {'disk_GiB':>9} "
              f"{'train_h(cpu)':>13} {'add_h(1 box)':>13} {f'add_h({workers} workers)':>18}")
    print(header)
    print("-" * len(header))
    for n in (10**7, 10**8, 10**9):
        nlist = big_nlist(n)
        hnsw = nlist >= 65536
        train_vecs = min(n, train_per_list * nlist)
        ram = n * (m + 8) + nlist * dim * 4 + (nlist * 32 * 2 * 4 if hnsw else 0)
        # assignment: a flat quantiser scans all nlist centroids; an HNSW32 one visits ~2k of them
        assign = (2048 if hnsw else nlist) / ref["nlist"]
        add_h = n / add_rate * max(1.0, assign) / 3600
        train_h = train_vecs * nlist / train_rate / 3600  # k-means: cost ~ sample x lists
        factory = f"IVF{nlist}{'_HNSW32' if hnsw else ''},PQ{m}x8"
        print(f"{n:>14,d} {factory:<26} {train_vecs:>11,d} {ram / 2**30:>8.1f} "
              f"{ram / workers / 2**30:>10.2f} {n * dim * 2 / 2**30:>9.0f} {train_h:>13.1f} {add_h:>13.1f} "
              f"{add_h / workers:>18.2f}")
    print("train_h(cpu): k-means on this machine's threads (faiss-gpu is ~50-100x faster); add_h: one machine like "
          "this one, or shards added in parallel. Serve the merged index memory-mapped (IO_FLAG_MMAP) or as "
          "IndexShards over the workers; nprobe as tuned above.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="N=20000, dim=64: runs in seconds")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="ivf_flat,ivf_pq")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--nlist", type=int, default=None, help="default: power of two near 4*sqrt(N)")
    ap.add_argument("--train-per-list", type=int, default=40, help="k-means sample per list (faiss: >= 39, up to 256)")
    ap.add_argument("--max-nprobe", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=64, help="parallel add workers assumed in the extrapolation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.dim, args.queries = "20000", 64, 300
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# index_scale: dim={args.dim} shards={args.shards} train_per_list={args.train_per_list} "
          f"max_nprobe={args.max_nprobe} faiss={faiss.__version__} threads={faiss.omp_get_max_threads()} "
          f"cpus={os.cpu_count()}", flush=True)
    header = (f"{'N':>10} {'kind':<13} {'nlist':>6} {'nprobe':>6} {'recall@10':>9} {'train_s':>8} {'add_s':>7} "
              f"{'merge_s':>7} {'total_s':>8} {'index_MiB':>9} {'B/vec':>6} {'peakRSS_GiB':>11} {'q/s':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for n in sizes:
        for kind in args.kinds.split(","):
            for r in measure(n, args.dim, kind, args.shards, args):
                rows.append(r)
                print(f"{n:>10,d} {r['label']:<13} {r['nlist']:>6} {r['nprobe']:>6} {r['recall_at_10']:>9.4f} "
                      f"{r['train_seconds']:>8.2f} {r['add_seconds']:>7.2f} {r['merge_seconds']:>7.2f} "
                      f"{r['wall_seconds']:>8.2f} {r['bytes'] / 2**20:>9.1f} {r['bytes_per_vector']:>6.1f} "
                      f"{r['peak_rss_gib']:>11.2f} {r['qps_batch']:>8.0f}", flush=True)
    extrapolate(rows, args.dim, args.workers, args.train_per_list)
    best = [r for r in rows if r["n"] == max(sizes)][-1]  # the largest N, most compact variant
    print(f"RATIO recall_at_10={best['recall_at_10']:.3f} bytes_per_vector={best['bytes_per_vector']:.1f} "
          f"add_vectors_per_s={best['n'] / max(best['add_seconds'], 1e-9):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
