"""Disk cache of the realignment corpus: the pairs' image embeddings, grouped by caption, in ``.npy`` shards.

Realignment (docs/method.md, stage 2) trains the text tail against a *frozen* image tower, so the
image side of every pair is fixed: it is embedded once (eval transform) and stored under the cache
folder, keyed by the tower's weights hash, the transform and the pairs' content. Both realignment
assets use this one mechanism: 2SFT realigns against the stage-1 tower and MCIP against the MCIP
tower, so each tower has its own entry, and a re-run with the same tower and pairs reuses it.

An entry holds one row per distinct caption, in first-seen order (the renormalised mean of its
images' embeddings, as the in-memory grouping did before the cache): ``embeddings-<i>.npy`` float32
[≤shard_rows, D], ``captions.arrow`` (one string column, uncompressed) and ``meta.json``, written
in a temporary folder and renamed into place when complete. Batches are read through memory maps
opened for the batch only (:meth:`CachedPairs.take`), so resident memory is bounded by the
shard and batch sizes, not by the number of pairs.

The build streams too: the pairs (a lazy parquet scan for a large corpus) are read ``shard_rows`` at a
time, each slice's captions are hash-partitioned into ``ceil(pairs / shard_rows)`` buckets on disk, each
bucket is grouped on its own, and the buckets' groups are merged back into first-seen order. What is
held whole is 24 bytes per distinct caption (first row, bucket, position in it: the merge order), not
the captions; a caption repeated on many images makes its bucket larger (its rows, 8 bytes each).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F

from clipopt_core.models.encode import embed_images
from clipopt_core.models.loading import ClipBundle
from clipopt_core.runtime import distributed
from clipopt_core.runtime.digest import frame_digest, frame_rows
from clipopt_core.train.identity import weights_digest

CACHE_VERSION = 2  # v2: large_string captions, meta holds the pair count
SHARD_ROWS = 65536
CACHE_FOLDER = "realign_embeddings"
META_FILE = "meta.json"
CAPTIONS_FILE = "captions.arrow"


@dataclass(frozen=True)
class CachedPairs:
    """One cache entry: ``rows`` distinct captions with their image embeddings [rows, dim], in shards."""

    folder: Path
    rows: int
    dim: int
    shard_rows: int
    pairs: int

    def __len__(self) -> int:
        return self.rows

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Rows ``indices`` [b] (long) → (embeddings [b, D] float32, L2-normalised; their b captions)."""
        rows = indices.numpy()
        with pa.memory_map(str(self.folder / CAPTIONS_FILE)) as source:
            captions = pa.ipc.open_file(source).read_all().column(0).take(pa.array(rows)).to_pylist()
        return torch.from_numpy(_read_rows(self.folder, "embeddings", self.shard_rows, rows, self.dim)), captions


def _read_rows(folder: Path, prefix: str, shard_rows: int, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``rows`` [b] of the shards ``<prefix>-<i>.npy`` (``shard_rows`` rows each) → float32 [b, dim].

    Each shard is memory-mapped only while its rows are copied out, so its pages leave the
    process's resident set right after.
    """
    out = np.empty((len(rows), dim), dtype=np.float32)
    shards = rows // shard_rows
    for shard in np.unique(shards):
        mask = shards == shard
        array = np.load(folder / f"{prefix}-{int(shard):05d}.npy", mmap_mode="r")
        out[mask] = array[rows[mask] - int(shard) * shard_rows]
        del array
    return out


def cache_key(bundle: ClipBundle, pairs: pl.DataFrame | pl.LazyFrame) -> str:
    """sha256 of (cache version, image tower weights, eval geometry, the pairs' content).

    The pairs' content is their captions in order and, per pair, the image's ``sha256`` column when
    present (:func:`clipopt_core.data.captions.realign_pairs` carries it), else its ``uri``.
    """
    lazy = pairs.lazy()
    content = lazy.select("caption", "sha256") if "sha256" in lazy.collect_schema().names() else lazy.select(
        "caption", pl.col("uri").alias("image"))
    record = {"version": CACHE_VERSION, "tower": weights_digest(bundle.model.visual), "size": bundle.image_size,
              "interpolation": bundle.interpolation, "pairs": frame_digest(content)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def realign_pair_cache(bundle: ClipBundle, pairs: pl.DataFrame | pl.LazyFrame, cache_dir: Path, *, device: str = "cpu",
                       shard_rows: int = SHARD_ROWS, log: Callable[[str], None] = lambda message: None) -> CachedPairs:
    """The cached, caption-grouped image embeddings of ``pairs`` (``uri``, ``caption``[, ``sha256``]) under
    ``bundle``'s image tower: read from ``cache_dir`` when an entry of the same key exists, else built there.

    Under ``torchrun`` rank 0 builds the entry and the other ranks open it after a barrier (the
    cache folder must be shared by the ranks, as it is on one node).
    """
    folder = Path(cache_dir) / CACHE_FOLDER / cache_key(bundle, pairs)[:32]
    distributed.run_on_main(_ensure, bundle, pairs, folder, shard_rows, device, log)  # every rank meets the barrier
    meta = json.loads((folder / META_FILE).read_text())
    return CachedPairs(folder, meta["rows"], meta["dim"], meta["shard_rows"], meta["pairs"])


def _ensure(bundle: ClipBundle, pairs: pl.DataFrame | pl.LazyFrame, folder: Path, shard_rows: int, device: str,
            log: Callable[[str], None]) -> None:
    """Build the entry at ``folder`` unless a complete one is there."""
    if (folder / META_FILE).exists():
        log(f"realignment embeddings reused from {folder}")
        return
    _build(bundle, pairs, folder, shard_rows, device, log)


def _build(bundle: ClipBundle, pairs: pl.DataFrame | pl.LazyFrame, folder: Path, shard_rows: int, device: str,
           log: Callable[[str], None]) -> None:
    """Embed the pairs slice by slice, group them by caption and publish the entry at ``folder`` (temp + rename)."""
    total = frame_rows(pairs)
    if total == 0:
        raise ValueError("the realignment corpus has no pairs: give caption_corpus a caption source, "
                         "or training images with captions")
    staging = folder.parent / f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    for part in ("raw", "parts", "buckets"):
        (staging / part).mkdir(parents=True)
    buckets, lazy = -(-total // shard_rows), pairs.lazy()
    try:
        slices = range(0, total, shard_rows)
        for number, start in enumerate(slices):
            block = lazy.slice(start, shard_rows).select("uri", "caption").collect()
            vectors = embed_images(bundle, block["uri"].to_list(), device=device)
            np.save(staging / "raw" / f"pairs-{number:05d}.npy", vectors.numpy())
            _write_part(staging / "parts" / f"{number:05d}", block["caption"], start, buckets)
            log(f"embedded {min(start + shard_rows, total)}/{total} realignment images")
        first_rows = [_group_bucket(staging, bucket, len(slices), shard_rows, bundle.embed_dim)
                      for bucket in range(buckets)]
        rows = _merge_buckets(staging, first_rows, shard_rows, bundle.embed_dim)
        for part in ("raw", "parts", "buckets"):
            shutil.rmtree(staging / part)
        (staging / META_FILE).write_text(json.dumps({"rows": rows, "dim": bundle.embed_dim,
                                                     "shard_rows": shard_rows, "pairs": total}))
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_part(stem: Path, captions: pl.Series, first_row: int, buckets: int) -> None:
    """One slice's (row, caption) sorted by caption bucket → ``<stem>.arrow`` + bucket offsets ``<stem>.npy`` [buckets + 1].

    The bucket is a hash of the caption (any hash does: it decides only which rows are grouped together,
    not the entry's order); rows keep their order inside a bucket.
    """
    frame = pl.DataFrame({"row": pl.int_range(first_row, first_row + len(captions), dtype=pl.Int64, eager=True),
                          "caption": captions}).with_columns((pl.col("caption").hash(seed=0) % buckets).alias("bucket"))
    frame = frame.sort("bucket", maintain_order=True)
    offsets = np.searchsorted(frame["bucket"].to_numpy(), np.arange(buckets + 1), side="left")
    np.save(stem.with_suffix(".npy"), offsets)
    _write_arrow(stem.with_suffix(".arrow"), frame.select("row", "caption").to_arrow())


def _group_bucket(staging: Path, bucket: int, slices: int, shard_rows: int, dim: int) -> np.ndarray:
    """Group one bucket's pairs by caption (first-seen order) → its means and captions under ``buckets/``;
    returns each group's first pair row [G_b] (int64, ascending), the key of the final order."""
    tables = []
    for number in range(slices):
        stem = staging / "parts" / f"{number:05d}"
        low, high = np.load(stem.with_suffix(".npy"))[bucket:bucket + 2]
        tables.append(_read_arrow(stem.with_suffix(".arrow")).slice(int(low), int(high - low)))
    groups = pl.from_arrow(pa.concat_tables(tables)).group_by("caption", maintain_order=True).agg("row")
    np.save(staging / "buckets" / f"{bucket:05d}.npy", _group_means(staging / "raw", shard_rows, groups["row"], dim))
    _write_arrow(staging / "buckets" / f"{bucket:05d}.arrow", pa.table({"caption": groups["caption"].to_arrow()}))
    return groups["row"].list.first().to_numpy().astype(np.int64)


def _merge_buckets(staging: Path, first_rows: list[np.ndarray], shard_rows: int, dim: int) -> int:
    """Write the buckets' groups in first-seen order as ``embeddings-<i>.npy`` + ``captions.arrow``; returns the rows."""
    bucket_of = np.repeat(np.arange(len(first_rows), dtype=np.int32), [len(rows) for rows in first_rows])
    position = np.concatenate([np.arange(len(rows), dtype=np.int32) for rows in first_rows])
    order = np.argsort(np.concatenate(first_rows), kind="stable")
    with pa.OSFile(str(staging / CAPTIONS_FILE), "wb") as sink, \
            pa.ipc.new_file(sink, pa.schema([("caption", pa.large_string())])) as writer:
        for number, start in enumerate(range(0, len(order), shard_rows)):
            picked = order[start:start + shard_rows]
            vectors, texts, places = np.empty((len(picked), dim), dtype=np.float32), [], []
            for bucket in np.unique(bucket_of[picked]):
                where = np.flatnonzero(bucket_of[picked] == bucket)
                rows = position[picked[where]]
                vectors[where] = np.load(staging / "buckets" / f"{bucket:05d}.npy", mmap_mode="r")[rows]
                texts.append(_read_arrow(staging / "buckets" / f"{bucket:05d}.arrow").column(0).take(pa.array(rows)))
                places.append(where)
            np.save(staging / f"embeddings-{number:05d}.npy", vectors)
            captions = pa.concat_arrays([c.combine_chunks().cast(pa.large_string()) for c in texts])
            writer.write_batch(pa.record_batch([captions.take(pa.array(np.argsort(np.concatenate(places))))],
                                               names=["caption"]))
    return len(order)


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file, memory-mapped (zero-copy: only the pages read become resident)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _group_means(raw: Path, shard_rows: int, members: pl.Series, dim: int) -> np.ndarray:
    """Per caption group (``members``: each group's pair rows), the renormalised mean embedding → float32 [G, dim].

    The member rows are read and summed ``shard_rows`` at a time, so a caption on very many images
    never brings all their embeddings into memory at once."""
    counts = members.list.len().to_numpy().astype(np.int64)
    rows = members.explode().to_numpy().astype(np.int64)
    owner = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    sums = torch.zeros(len(counts), dim)
    for start in range(0, len(rows), shard_rows):
        vectors = torch.from_numpy(_read_rows(raw, "pairs", shard_rows, rows[start:start + shard_rows], dim))
        sums.index_add_(0, owner[start:start + shard_rows], vectors)
    return F.normalize(sums / torch.from_numpy(counts).unsqueeze(1).float(), dim=-1).numpy()


def _publish(staging: Path, folder: Path) -> None:
    """Rename the complete entry into place; a same-key entry published meanwhile by another run wins."""
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / META_FILE).exists():
            raise
