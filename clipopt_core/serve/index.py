"""Nearest-neighbour indexes (faiss, inner product on L2-normalised float32 vectors).

Index choice rule (:func:`choose_index_kind`, for ``kind="auto"``), with ``N`` vectors of
dimension ``D``:

1. ``flat`` (exact ``IndexFlatIP``) when ``N <= 50_000`` or the raw vectors take at most
   64 MiB (``N*D*4``): an exhaustive scan is cheap and exact.
2. ``ivf_flat`` when the IVF-Flat footprint (``N*(4D + 8)`` bytes of codes and ids plus
   ``nlist*D*4`` of centroids) fits ``memory_budget_bytes``.
3. ``ivf_pq`` otherwise, with ``pq_m`` (bytes per code) the largest divisor of ``D`` that is
   ``<= D//4`` and keeps ``N*(pq_m + 8)`` plus centroids within the budget.
``hnsw`` is only built when asked for explicitly.

IVF: ``nlist`` defaults to ``round(4*sqrt(N))`` clipped to ``[1, N//39]``; the coarse quantiser
is trained with seeded spherical k-means on at most ``256*nlist`` sampled vectors (IVF-PQ uses
at least 10 000 when available, for the 256-centroid sub-quantisers). ``nprobe`` (HNSW:
``efSearch``) is tuned on a query sample drawn, when possible, from vectors outside the training
sample: doubling until recall@10 against exact search reaches ``target_recall``, then bisection
down to within ~12 %. Recall here always excludes the query's own id (the queries are database
vectors, and finding oneself would inflate recall by 1/k).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import faiss
import numpy as np

__all__ = [
    "IndexSpec",
    "TUNE_K",
    "auto_nlist",
    "auto_pq_m",
    "choose_index_kind",
    "empty_ivf_index",
    "ivf_train_size",
    "ensure_threads",
    "drop_self",
    "overlap",
    "tune",
    "index_bytes",
    "build_index",
    "recall_at_k_vs_exact",
    "search",
    "serialize_index",
    "deserialize_index",
    "read_index",
]

FLAT_MAX_N = 50_000
FLAT_MAX_BYTES = 64 * 2**20
_TUNE_QUERIES = 1000
TUNE_K = 10


@dataclass(frozen=True)
class IndexSpec:
    """How to build an index; ``None`` fields are chosen automatically (see module docstring)."""

    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    memory_budget_bytes: int = 8 * 2**30
    nlist: int | None = None
    nprobe: int | None = None  # IVF nprobe; for HNSW a fixed efSearch
    pq_m: int | None = None
    hnsw_m: int = 32
    target_recall: float = 0.95


def ensure_threads() -> int:
    """Cap faiss' OpenMP threads at the cores this process may use (never raise a lower setting)."""
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if faiss.omp_get_max_threads() > avail:
        faiss.omp_set_num_threads(avail)
    return faiss.omp_get_max_threads()


def auto_nlist(n: int) -> int:
    """Default IVF list count for ``n`` vectors: ``round(4*sqrt(n))`` clipped to ``[1, n//39]``."""
    return int(min(max(1, round(4 * math.sqrt(n))), max(1, n // 39)))


def _ivf_flat_bytes(n: int, dim: int, nlist: int) -> int:
    return n * (4 * dim + 8) + nlist * dim * 4


def auto_pq_m(n: int, dim: int, nlist: int, budget: int) -> int:
    """Largest PQ code size (bytes per vector) dividing ``dim``, ``<= dim//4``, within ``budget`` bytes."""
    fixed = nlist * dim * 4 + 256 * dim * 4  # coarse centroids + PQ codebooks
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0 and n * (m + 8) + fixed <= budget:
            return m
    raise ValueError(f"{n} vectors of dim {dim} do not fit memory_budget_bytes={budget} even as IVF-PQ")


def ivf_train_size(kind: str, n: int, nlist: int, per_list: int = 256) -> int:
    """Training sample size: ``per_list × nlist`` vectors (IVF-PQ: at least 10 000), at most ``n``."""
    return min(n, per_list * nlist) if kind == "ivf_flat" else min(n, max(per_list * nlist, 10_000))


def empty_ivf_index(kind: str, dim: int, nlist: int, pq_m: int | None, seed: int) -> faiss.Index:
    """An untrained inner-product ``IVF{nlist},Flat`` / ``IVF{nlist},PQ{pq_m}x8`` with seeded spherical k-means."""
    if kind not in ("ivf_flat", "ivf_pq"):
        raise ValueError(f"{kind!r} is not an IVF kind (ivf_flat, ivf_pq)")
    if kind == "ivf_pq" and (pq_m is None or dim % pq_m):
        raise ValueError(f"pq_m={pq_m} must divide dim={dim}")
    factory = f"IVF{nlist},Flat" if kind == "ivf_flat" else f"IVF{nlist},PQ{pq_m}x8"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.cp.spherical = True  # centroids on the sphere: right for inner product on unit vectors
    if kind == "ivf_pq":
        ivf.pq.cp.seed = seed
        ivf.do_polysemous_training = False  # factory default; costly and unused by IVF-PQ search
    return index


def choose_index_kind(n: int, dim: int, spec: IndexSpec) -> str:
    """Index kind for ``n`` vectors of dimension ``dim`` (rule in the module docstring)."""
    if spec.kind != "auto":
        return spec.kind
    if n <= FLAT_MAX_N or n * dim * 4 <= FLAT_MAX_BYTES:
        return "flat"
    nlist = spec.nlist or auto_nlist(n)
    if _ivf_flat_bytes(n, dim, nlist) <= spec.memory_budget_bytes:
        return "ivf_flat"
    return "ivf_pq"


def _as_f32(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"expected a [N, {dim or 'D'}] array, got shape {x.shape}")
    return x


def _exact_neighbours(vectors: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    _, ids = faiss.knn(vectors[qids], vectors, min(k + 1, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    return drop_self(ids, qids, k)


def drop_self(ids: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """``ids [Q, k+1]`` -> ``[Q, k]`` without each query's own id (or without the last column)."""
    keep = ids != qids[:, None]
    keep[keep.all(axis=1), -1] = False
    if ids.shape[1] <= k:  # fewer than k+1 vectors in total
        return np.where(keep, ids, -1)
    return ids[keep].reshape(len(qids), k)


def overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours ``[Q, k]`` found in the approximate rows (1.0 if none exist)."""
    valid = exact >= 0
    if not valid.any():
        return 1.0
    hit = ((approx[:, :, None] == exact[:, None, :]) & (approx[:, :, None] >= 0)).any(axis=1) & valid
    return float(hit.sum() / valid.sum())


def _recall(index: faiss.Index, vectors: np.ndarray, qids: np.ndarray, exact: np.ndarray, k: int) -> float:
    _, ids = index.search(vectors[qids], min(k + 1, index.ntotal))
    return overlap(drop_self(ids, qids, k), exact)


def recall_at_k_vs_exact(
    index: faiss.Index, vectors: np.ndarray, *, k: int = 10, sample: int = 1000, seed: int = 0
) -> float:
    """Recall@k of ``index`` against exact inner-product search over ``vectors [N, D]``.

    ``sample`` query rows are drawn (seeded) from ``vectors``; each query's own id is excluded
    from both neighbour lists. Returns the fraction of the exact top-k that is retrieved
    (1.0 when there is nothing to retrieve, e.g. a single vector or ``k=0``).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ensure_threads()
    vectors = _as_f32(vectors, index.d)
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    return _recall(index, vectors, qids, _exact_neighbours(vectors, qids, k), k)


def tune(evaluate: Callable[[int], float], lo: int, hi: int, target: float) -> tuple[int, float]:
    """Smallest-ish ``p`` in ``[lo, hi]`` with ``evaluate(p) >= target`` (recall grows with p).

    Doubles from ``lo``; then bisects between the last failing and first passing value until
    they are within ~12 %. Returns ``(p, recall)``; ``(hi, recall(hi))`` if the target is unmet.
    """
    p, fail, results = lo, None, {}
    while True:
        results[p] = evaluate(p)
        if results[p] >= target or p >= hi:
            break
        fail, p = p, min(2 * p, hi)
    if results[p] < target or fail is None:
        return p, results[p]
    good = p
    while good - fail > max(1, good // 8):
        mid = (good + fail) // 2
        results[mid] = evaluate(mid)
        if results[mid] >= target:
            good = mid
        else:
            fail = mid
    return good, results[good]


def build_index(vectors: np.ndarray, spec: IndexSpec = IndexSpec(), *, seed: int = 0) -> tuple[faiss.Index, dict]:
    """Build (train, fill, tune) an inner-product index over ``vectors [N, D]`` float32, normalised.

    Returns ``(index, info)``; ``info`` has ``kind, n, dim, nlist, nprobe, pq_m, ef_search,
    train_size, tuned_recall, target_met, build_seconds`` (incl. tuning) and ``bytes``
    (estimated in-memory size). The tuned ``nprobe``/``efSearch`` is set on the index.
    """
    ensure_threads()
    vectors = _as_f32(vectors)
    n, dim = vectors.shape
    if n == 0:
        raise ValueError("cannot build an index over zero vectors")
    if not 0 < spec.target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {spec.target_recall}")
    kind = choose_index_kind(n, dim, spec)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    info: dict = dict(kind=kind, n=n, dim=dim, nlist=None, nprobe=None, pq_m=None, ef_search=None,
                      train_size=0, tuned_recall=None, target_met=None)
    qids_pool = np.arange(n)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
    elif kind in ("ivf_flat", "ivf_pq"):
        nlist = spec.nlist or auto_nlist(n)
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, N={n}], got {nlist}")
        if spec.nprobe is not None and not 1 <= spec.nprobe <= nlist:
            raise ValueError(f"nprobe must be in [1, nlist={nlist}], got {spec.nprobe}")
        if kind == "ivf_pq":
            info["pq_m"] = spec.pq_m or auto_pq_m(n, dim, nlist, spec.memory_budget_bytes)
        index = empty_ivf_index(kind, dim, nlist, info["pq_m"], seed)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        train_size = ivf_train_size(kind, n, nlist)
        perm = rng.permutation(n)
        index.train(vectors[np.sort(perm[:train_size])])
        index.add(vectors)
        if n - train_size >= min(_TUNE_QUERIES, n):
            qids_pool = perm[train_size:]  # held out from training
        info.update(nlist=nlist, train_size=train_size)

        def set_param(p: int) -> None:
            ivf.nprobe = p

        bounds = (1, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)

        def set_param(p: int) -> None:
            index.hnsw.efSearch = p

        bounds = (TUNE_K, max(TUNE_K, min(n, 4096)))
    else:
        raise ValueError(f"unknown index kind {kind!r}")

    if kind != "flat":
        fixed = spec.nprobe
        qids = np.sort(rng.choice(qids_pool, size=min(_TUNE_QUERIES, len(qids_pool)), replace=False))
        exact = _exact_neighbours(vectors, qids, TUNE_K)

        def evaluate(p: int) -> float:
            set_param(p)
            return _recall(index, vectors, qids, exact, TUNE_K)

        if fixed is not None:
            p, rec = fixed, evaluate(fixed)
        else:
            p, rec = tune(evaluate, *bounds, spec.target_recall)
        set_param(p)
        info.update({"nprobe" if kind != "hnsw" else "ef_search": p,
                     "tuned_recall": rec, "target_met": rec >= spec.target_recall})
    info["build_seconds"] = time.perf_counter() - t0
    info["bytes"] = index_bytes(index)
    return index, info


def index_bytes(index: faiss.Index) -> int:
    """Estimated in-memory size of ``index`` in bytes (exact serialized size as a fallback)."""
    if isinstance(index, faiss.IndexFlatCodes):
        return int(index.ntotal * index.code_size)
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        ivf = None
    if ivf is not None:
        extra = int(ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4) if hasattr(ivf, "pq") else 0
        return int(ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4 + extra)
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        return int(index.ntotal * index.d * 4 + h.neighbors.size() * 4 + h.levels.size() * 4
                   + h.offsets.size() * 8)
    return len(serialize_index(index))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` search for ``queries [Q, D]``.

    Returns ``scores [Q, k]`` float32 (inner products, ``-inf`` for empty slots) and
    ``ids [Q, k]`` int64 (``-1`` for empty slots, e.g. when ``k`` exceeds the index size).
    """
    ensure_threads()
    q = _as_f32(queries, index.d)
    scores, ids = index.search(q, k)
    ids = ids.astype(np.int64, copy=False)
    scores = np.where(ids < 0, np.float32(-np.inf), scores).astype(np.float32, copy=False)
    return scores, ids


def serialize_index(index: faiss.Index) -> bytes:
    """faiss' own binary format (includes nprobe / efSearch)."""
    return faiss.serialize_index(index).tobytes()


def deserialize_index(
    data: bytes, *, expected_dim: int | None = None, expected_count: int | None = None
) -> faiss.Index:
    """Inverse of :func:`serialize_index`; raises ``ValueError`` on unreadable data or when the
    index's dimension / vector count differs from ``expected_dim`` / ``expected_count``."""
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
    except RuntimeError as e:
        raise ValueError(f"could not deserialize faiss index ({len(data)} bytes): {e}") from e
    return _checked(index, expected_dim, expected_count)


def read_index(path: Path, *, mmap: bool = True, expected_dim: int | None = None,
               expected_count: int | None = None) -> faiss.Index:
    """Read a faiss index file; ``mmap`` maps IVF lists / flat codes from disk instead of loading them.

    IVF files (fourcc ``Iw…``) use ``IO_FLAG_MMAP`` (read-only inverted lists over the mapping, so an
    index larger than RAM is searched through the page cache); others ``IO_FLAG_MMAP_IFC`` (flat
    codes). The two flags cannot be combined. Raises ``ValueError`` like :func:`deserialize_index`.
    """
    flags = 0
    if mmap:
        with open(path, "rb") as handle:
            ivf = handle.read(2) == b"Iw"
        flags = faiss.IO_FLAG_MMAP if ivf else getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise ValueError(f"could not read faiss index file {path} ({os.path.getsize(path)} bytes): {e}") from e
    return _checked(index, expected_dim, expected_count)


def _checked(index: faiss.Index, expected_dim: int | None, expected_count: int | None) -> faiss.Index:
    if expected_dim is not None and index.d != expected_dim:
        raise ValueError(f"index dimension mismatch: expected {expected_dim}, found {index.d}")
    if expected_count is not None and index.ntotal != expected_count:
        raise ValueError(f"index vector count mismatch: expected {expected_count}, found {index.ntotal}")
    return index
