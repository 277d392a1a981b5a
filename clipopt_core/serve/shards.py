"""Sharded gallery embeddings and one faiss index built from the shards (faiss's recipe for big indexes).

1. :func:`shard_of` assigns every image to a shard by a stable hash of its ``image_id`` (blake2b, not
   Python's salted ``hash``): the same image lands in the same shard on every machine and run, and a
   new image changes only its own shard.
2. :func:`embed_shard` embeds one shard's rows (sorted, so row order is deterministic) and publishes
   ``<prefix>/embeddings/shard-00002-of-00004.parquet`` + a JSON sidecar through the
   :class:`ArtifactStore`. It is idempotent: a shard whose sidecar names the same model key and the same
   image ids is skipped. Shards are independent (one worker, pod or GPU each).
3. :func:`build_sharded_index` trains the IVF coarse quantiser (and PQ codebooks) **once** on a seeded
   sample drawn across all shards, adds each shard to its own copy of the trained empty index
   (``add_with_ids``; independent, parallelisable), and merges them (``merge_from``; they could also be
   served unmerged with ``faiss.IndexShards``). Ids are global row numbers in shard order (shard ``s``
   starts at the sum of the earlier shards' sizes), so ``<prefix>/index/ids.parquet`` row ``i`` is id ``i``,
   the convention of :class:`clipopt_core.serve.search.SearchService`. ``nprobe`` is tuned and recall@10 measured
   against exact search computed shard by shard.
4. The merged index is saved as a file that :func:`clipopt_core.serve.index.read_index` memory-maps
   (``faiss.IO_FLAG_MMAP``): the inverted lists stay on disk and the page cache holds the hot ones, so
   an index larger than RAM can be served.

An HNSW graph cannot be assembled from independently built shards: ``kind="hnsw"`` concatenates the
shards on one machine and builds the graph there (:func:`clipopt_core.serve.index.build_index`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clipopt_core.serve import index as index_lib
from clipopt_core.runtime.storage import ArtifactStore

DEFAULT_PREFIX = "serving"
DEFAULT_SHARDS = 4
SERVED_FOLDER = "index"  # what clipopt search serves
STAGING_FOLDER = "index-staging"  # a built candidate, promoted to SERVED_FOLDER only when it passes (serve.promotion)
META_COLUMNS = ("image_id", "uri", "label", "caption", "source")
DEFAULT_BATCH_ROWS = 65_536  # images embedded and written per parquet row group (768-d: 192 MiB of vectors)
EmbedFn = Callable[[Sequence[str]], np.ndarray]  # uris -> float32 [n, D], rows L2-normalised


def shard_count(environ: dict[str, str] | None = None) -> int:
    """The number of gallery shards configured in ``environ`` (default: the process environment):
    ``CLIPOPT_GALLERY_SHARDS``, default :data:`DEFAULT_SHARDS`."""
    raw = (os.environ if environ is None else environ).get("CLIPOPT_GALLERY_SHARDS", str(DEFAULT_SHARDS))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"CLIPOPT_GALLERY_SHARDS must be a positive integer (shards of the gallery index), got {raw!r}")
    return int(raw)


def shard_of(image_id: str, num_shards: int) -> int:
    """Shard of ``image_id`` in ``[0, num_shards)``: blake2b-64 of the id, modulo ``num_shards``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") % num_shards


def shard_rows(manifest: pl.DataFrame, shard: int, num_shards: int) -> pl.DataFrame:
    """The manifest rows of ``shard`` in a deterministic order (image_id, label, uri)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    owner = pl.Series([shard_of(i, num_shards) for i in manifest["image_id"].to_list()], dtype=pl.Int64)
    return manifest.filter(owner == shard).sort("image_id", "label", "uri")


def shard_key(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}/embeddings/shard-{shard:05d}-of-{num_shards:05d}.parquet"


def index_key(prefix: str, name: str, folder: str = SERVED_FOLDER) -> str:
    """Key of ``name`` (merged.faiss, trained.faiss, ids.parquet, info.json, shard-00003.faiss) under ``prefix``.

    ``folder``: :data:`SERVED_FOLDER` (served) or :data:`STAGING_FOLDER` (a candidate not yet promoted).
    """
    return f"{prefix}/{folder}/{name}"


def _ids_digest(model_key: str, rows: pl.DataFrame) -> str:
    blob = json.dumps([model_key, rows["image_id"].to_list(), rows["uri"].to_list()])
    return hashlib.sha256(blob.encode()).hexdigest()


def embed_shard(manifest: pl.DataFrame, shard: int, num_shards: int, store: ArtifactStore, embed: EmbedFn, *,
                model_key: str, prefix: str = DEFAULT_PREFIX, batch_rows: int = DEFAULT_BATCH_ROWS) -> dict[str, Any]:
    """Embed and publish one shard (skipped when already published for the same model and rows).

    Returns the sidecar: ``shard, num_shards, rows, dim, model_key, digest, key`` and ``skipped``.
    The parquet holds the manifest's metadata columns present plus ``embedding`` (float32 [D] per row).
    ``embed`` is called on at most ``batch_rows`` images at a time and each batch is written as one parquet
    row group of a local temporary file, published when complete: memory holds one batch's vectors
    (``batch_rows × D × 4`` bytes), not the shard's vectors plus a frame copy of them.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    rows = shard_rows(manifest, shard, num_shards)
    key = shard_key(prefix, shard, num_shards)
    digest = _ids_digest(model_key, rows)
    sidecar_key = key.replace(".parquet", ".json")
    if store.exists(sidecar_key) and store.exists(key):
        existing = store.read_json(sidecar_key)
        if existing.get("digest") == digest:
            return {**existing, "skipped": True}
    meta = rows.select([c for c in META_COLUMNS if c in rows.columns])
    if rows.height == 0:
        dim, sha = 0, store.write_parquet(key, meta)
    else:
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "shard.parquet"
            dim = _write_embedded(local, meta, rows["uri"], embed, batch_rows)
            sha = store.put_file(local, key)
    sidecar = {"shard": shard, "num_shards": num_shards, "rows": rows.height, "dim": dim, "model_key": model_key,
               "digest": digest, "key": key, "sha256": sha}
    store.write_json(sidecar_key, sidecar)  # written last: a shard without its sidecar is recomputed
    return {**sidecar, "skipped": False}


def _write_embedded(path: Path, meta: pl.DataFrame, uris: pl.Series, embed: EmbedFn, batch_rows: int) -> int:
    """Write ``meta`` plus ``embedding`` (fixed-size float32 lists) to ``path``, one row group per batch; returns D."""
    writer, dim = None, 0
    try:
        for start in range(0, meta.height, batch_rows):
            vectors = np.ascontiguousarray(embed(uris.slice(start, batch_rows).to_list()), dtype=np.float32)
            dim = int(vectors.shape[1])
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
            table = meta.slice(start, batch_rows).to_arrow().append_column("embedding", embedding)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return dim


def read_shard(store: ArtifactStore, prefix: str, shard: int, num_shards: int) -> tuple[pl.DataFrame, np.ndarray]:
    """(metadata frame, vectors float32 [n, D]) of a published shard."""
    key = shard_key(prefix, shard, num_shards)
    if not store.exists(key.replace(".parquet", ".json")):
        raise FileNotFoundError(f"{store.url(key)} is not published; run embed_shard for shard {shard} first")
    frame = store.read_parquet(key)
    if frame.height == 0 or "embedding" not in frame.columns:
        return frame, np.zeros((0, 0), dtype=np.float32)
    return frame.drop("embedding"), np.ascontiguousarray(frame["embedding"].to_numpy(), dtype=np.float32)


def _empty_index(kind: str, n: int, dim: int, spec: index_lib.IndexSpec, seed: int,
                 train_per_list: int) -> tuple[faiss.Index, dict[str, Any]]:
    """An untrained index of ``kind`` sized for ``n`` vectors, and its plan (nlist, pq_m, train_size)."""
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {"train_size": 0}
    if kind not in ("ivf_flat", "ivf_pq"):
        raise ValueError(f"kind {kind!r} cannot be built from shards; use flat, ivf_flat or ivf_pq")
    nlist = spec.nlist or index_lib.auto_nlist(n)
    pq_m = (spec.pq_m or index_lib.auto_pq_m(n, dim, nlist, spec.memory_budget_bytes)) if kind == "ivf_pq" else None
    return (index_lib.empty_ivf_index(kind, dim, nlist, pq_m, seed),
            {"nlist": nlist, "pq_m": pq_m, "train_size": index_lib.ivf_train_size(kind, n, nlist, train_per_list)})


def _top_k_merge(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-``k`` of concatenated candidate lists ``[Q, m]`` (descending scores)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def build_from_shards(load: Callable[[int], np.ndarray], counts: Sequence[int], dim: int,
                      spec: index_lib.IndexSpec = index_lib.IndexSpec(), *, seed: int = 0, tune_queries: int = 1000,
                      train_per_list: int = 256, max_nprobe: int | None = None,
                      on_shard: Callable[[int, faiss.Index], None] | None = None) -> tuple[faiss.Index, dict[str, Any], bytes]:
    """The recipe on any shard source: ``load(s)`` → float32 ``[counts[s], dim]`` (normalised); each is read twice.

    Pass 1 draws the training sample (``train_per_list × nlist`` vectors, proportional to shard size)
    and tuning queries held out from it; the quantiser is trained once. Pass 2 adds every shard to a copy
    of the trained empty index (``on_shard(s, index)`` sees each, e.g. to save it) and computes the exact
    top-k of the queries shard by shard. The copies are merged (``merge_from``), ``nprobe`` is tuned up to
    ``max_nprobe`` (default nlist). Returns ``(merged, info, trained empty index bytes)``.
    """
    index_lib.ensure_threads()
    started = time.perf_counter()
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = int(counts.sum())
    if n == 0:
        raise ValueError("the shards hold no vectors")
    kind = index_lib.choose_index_kind(n, dim, spec)
    empty, plan = _empty_index(kind, n, dim, spec, seed, train_per_list)
    rng = np.random.default_rng(seed)
    want_train = [math.ceil(plan["train_size"] * c / n) for c in counts]
    want_query = [math.ceil(min(tune_queries, n) * c / n) for c in counts]
    train_parts, query_ids, query_parts = [], [], []
    for shard in range(len(counts)):
        vectors = _shard_vectors(load, shard, dim)
        perm = rng.permutation(len(vectors))
        held_out = perm[want_train[shard]:] if len(perm) - want_train[shard] >= want_query[shard] else perm
        query_rows = np.sort(held_out[:want_query[shard]])
        train_parts.append(vectors[np.sort(perm[:want_train[shard]])])
        query_parts.append(vectors[query_rows])
        query_ids.append(offsets[shard] + query_rows)
    queries, qids = np.concatenate(query_parts), np.concatenate(query_ids).astype(np.int64)
    t0 = time.perf_counter()
    if kind != "flat":
        empty.train(np.concatenate(train_parts))
    trained = faiss.serialize_index(empty).tobytes()
    train_seconds, train_parts = time.perf_counter() - t0, []
    k = index_lib.TUNE_K
    exact_scores = np.full((len(qids), 0), -np.inf, dtype=np.float32)
    exact_ids = np.zeros((len(qids), 0), dtype=np.int64)
    merged, add_seconds, merge_seconds = None, 0.0, 0.0
    for shard in range(len(counts)):
        vectors = _shard_vectors(load, shard, dim)
        t0 = time.perf_counter()
        part = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))  # a copy of the trained empty index
        part.add_with_ids(vectors, offsets[shard] + np.arange(len(vectors), dtype=np.int64))
        add_seconds += time.perf_counter() - t0
        if len(vectors):
            scores, ids = faiss.knn(queries, vectors, min(k + 1, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
            exact_scores, exact_ids = _top_k_merge(np.hstack([exact_scores, scores]),
                                                   np.hstack([exact_ids, ids + offsets[shard]]), k + 1)
        if on_shard is not None:
            on_shard(shard, part)
        t0 = time.perf_counter()
        if merged is None:
            merged = part
        else:
            merged.merge_from(part, 0)  # ids are already global; empties ``part``
        merge_seconds += time.perf_counter() - t0
    exact = index_lib.drop_self(exact_ids, qids, k)
    info: dict[str, Any] = {"kind": kind, "n": n, "dim": dim, "num_shards": len(counts), "nlist": plan.get("nlist"),
                            "pq_m": plan.get("pq_m"), "train_size": plan["train_size"], "nprobe": None}
    if kind == "flat":
        info.update(tuned_recall=1.0, target_met=True)
    else:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(merged))

        def evaluate(p: int) -> float:
            ivf.nprobe = p
            _, ids = merged.search(queries, min(k + 1, n))
            return index_lib.overlap(index_lib.drop_self(ids, qids, k), exact)

        top = min(max_nprobe or ivf.nlist, ivf.nlist)
        nprobe, recall = ((spec.nprobe, evaluate(spec.nprobe)) if spec.nprobe
                          else index_lib.tune(evaluate, 1, top, spec.target_recall))
        ivf.nprobe = nprobe
        info.update(nprobe=nprobe, tuned_recall=recall, target_met=recall >= spec.target_recall)
    info.update(recall_at_10=info["tuned_recall"], train_seconds=train_seconds, add_seconds=add_seconds,
                merge_seconds=merge_seconds, build_seconds=time.perf_counter() - started,
                bytes=index_lib.index_bytes(merged))
    return merged, info, trained


def _shard_vectors(load: Callable[[int], np.ndarray], shard: int, dim: int) -> np.ndarray:
    vectors = load(shard)
    return vectors if len(vectors) else np.zeros((0, dim), dtype=np.float32)


def build_sharded_index(store: ArtifactStore, num_shards: int, spec: index_lib.IndexSpec = index_lib.IndexSpec(), *,
                        prefix: str = DEFAULT_PREFIX, seed: int = 0, tune_queries: int = 1000,
                        save: bool = True, folder: str = SERVED_FOLDER) -> tuple[faiss.Index, dict[str, Any]]:
    """:func:`build_from_shards` over the published shards of ``prefix``; returns ``(index, info)``.

    ``info``: ``kind, n, dim, num_shards, nlist, nprobe, pq_m, train_size, tuned_recall, target_met,
    target_recall, recall_at_10`` (on held-out queries vs exact), ``build_seconds, bytes`` and, for
    the sharded kinds, ``train_seconds, add_seconds, merge_seconds``. With ``save`` the trained empty
    index (reused to add new shards) and each shard's index (sharded kinds), then the merged index,
    ``ids.parquet`` (row i = id i) and last ``info.json`` (the commit marker) go to ``<prefix>/<folder>/``.
    """
    sidecars = [store.read_json(shard_key(prefix, s, num_shards).replace(".parquet", ".json")) for s in range(num_shards)]
    counts = [int(c["rows"]) for c in sidecars]
    dim = max(int(c["dim"]) for c in sidecars)

    def load(shard: int) -> np.ndarray:
        return read_shard(store, prefix, shard, num_shards)[1]

    def save_shard(shard: int, part: faiss.Index) -> None:
        _put_index(store, index_key(prefix, f"shard-{shard:05d}.faiss", folder), part)

    if index_lib.choose_index_kind(sum(counts), dim, spec) == "hnsw":  # one graph over all vectors, on one machine
        merged, info = index_lib.build_index(np.concatenate([_shard_vectors(load, s, dim) for s in range(num_shards)]),
                                             spec, seed=seed)
        info.update(num_shards=num_shards, recall_at_10=info["tuned_recall"])
    else:
        merged, info, trained = build_from_shards(load, counts, dim, spec, seed=seed, tune_queries=tune_queries,
                                                  on_shard=save_shard if save else None)
        if save:
            store.write_bytes(index_key(prefix, "trained.faiss", folder), trained)
    info["target_recall"] = spec.target_recall
    if save:
        _put_index(store, index_key(prefix, "merged.faiss", folder), merged)
        frames = [read_shard(store, prefix, s, num_shards)[0] for s in range(num_shards)]
        store.write_parquet(index_key(prefix, "ids.parquet", folder),
                            pl.concat([f for f in frames if f.height], how="diagonal"))
        store.write_json(index_key(prefix, "info.json", folder), info)
    return merged, info


def _put_index(store: ArtifactStore, key: str, index: faiss.Index) -> None:
    """Write ``index`` with faiss' file writer (no in-memory copy of the serialisation) and publish it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{uuid.uuid4().hex}.faiss"
        faiss.write_index(index, str(path))
        store.put_file(path, key)


def local_index_file(store: ArtifactStore, key: str, cache_dir: Path) -> Path:
    """A local path of ``key`` for :func:`clipopt_core.serve.index.read_index` (the file itself in a local store, else a cached download)."""
    if store.is_local:
        return Path(store.path(key))
    target = cache_dir / key
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    store.fs.get_file(store.path(key), str(temp))
    os.replace(temp, target)
    return target
