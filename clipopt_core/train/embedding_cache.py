"""Disk cache of the realignment corpus: the pairs' image embeddings, grouped by caption, in ``.npy`` shards.

Realignment (docs/method.md, stage 2) trains the text tail against a *frozen* image tower, so the
image side of every pair is fixed: it is embedded once (eval transform) and stored under the cache
folder, keyed by the tower's weights hash, the transform and the pairs' content. Both realignment
assets use this one mechanism: 2SFT realigns against the stage-1 tower and MCIP against the MCIP
tower, so each tower has its own entry, and a re-run with the same tower and pairs reuses it.

An entry holds one row per distinct caption (the renormalised mean of its images' embeddings,
as the in-memory grouping did before the cache): ``embeddings-<i>.npy`` float32
[≤shard_rows, D], ``captions.arrow`` (one string column, uncompressed) and ``meta.json``, written
in a temporary folder and renamed into place when complete. Batches are read through memory maps
opened for the batch only (:meth:`CachedPairs.take`), so resident memory is bounded by the
shard and batch sizes, not by the number of pairs.
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
from clipopt_core.train.identity import frame_digest, weights_digest

CACHE_VERSION = 1
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


def cache_key(bundle: ClipBundle, pairs: pl.DataFrame) -> str:
    """sha256 of (cache version, image tower weights, eval geometry, the pairs' content).

    The pairs' content is their captions in order and, per pair, the image's ``sha256`` column when
    present (:func:`clipopt_core.data.captions.realign_pairs` carries it), else its ``uri``.
    """
    content = pairs.select("caption", "sha256") if "sha256" in pairs.columns else pairs.select(
        "caption", pl.col("uri").alias("image"))
    record = {"version": CACHE_VERSION, "tower": weights_digest(bundle.model.visual), "size": bundle.image_size,
              "interpolation": bundle.interpolation, "pairs": frame_digest(content)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def realign_pair_cache(bundle: ClipBundle, pairs: pl.DataFrame, cache_dir: Path, *, device: str = "cpu",
                       shard_rows: int = SHARD_ROWS, log: Callable[[str], None] = lambda message: None) -> CachedPairs:
    """The cached, caption-grouped image embeddings of ``pairs`` (``uri``, ``caption``[, ``sha256``]) under
    ``bundle``'s image tower: read from ``cache_dir`` when an entry of the same key exists, else built there.

    Under ``torchrun`` rank 0 builds the entry and the other ranks open it after a barrier (the
    cache folder must be shared by the ranks, as it is on one node).
    """
    folder = Path(cache_dir) / CACHE_FOLDER / cache_key(bundle, pairs)[:32]
    distributed.run_on_main(_ensure, bundle, pairs, folder, shard_rows, device, log)  # every rank meets the barrier
    meta = json.loads((folder / META_FILE).read_text())
    return CachedPairs(folder, meta["rows"], meta["dim"], meta["shard_rows"])


def _ensure(bundle: ClipBundle, pairs: pl.DataFrame, folder: Path, shard_rows: int, device: str,
            log: Callable[[str], None]) -> None:
    """Build the entry at ``folder`` unless a complete one is there."""
    if (folder / META_FILE).exists():
        log(f"realignment embeddings reused from {folder}")
        return
    _build(bundle, pairs, folder, shard_rows, device, log)


def _build(bundle: ClipBundle, pairs: pl.DataFrame, folder: Path, shard_rows: int, device: str,
           log: Callable[[str], None]) -> None:
    """Embed the pairs shard by shard, group them by caption and publish the entry at ``folder`` (temp + rename)."""
    if pairs.height == 0:
        raise ValueError("the realignment corpus has no pairs: give caption_corpus a caption source, "
                         "or training images with captions")
    staging = folder.parent / f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    (staging / "raw").mkdir(parents=True)
    try:
        uris = pairs["uri"]
        for number, start in enumerate(range(0, pairs.height, shard_rows)):
            block = embed_images(bundle, uris.slice(start, shard_rows).to_list(), device=device)
            np.save(staging / "raw" / f"pairs-{number:05d}.npy", block.numpy())
            log(f"embedded {min(start + shard_rows, pairs.height)}/{pairs.height} realignment images")
        groups = pairs.select("caption").with_row_index("row").group_by("caption", maintain_order=True).agg("row")
        for number, start in enumerate(range(0, groups.height, shard_rows)):
            block = groups.slice(start, shard_rows)
            means = _group_means(staging / "raw", shard_rows, block["row"], bundle.embed_dim)
            np.save(staging / f"embeddings-{number:05d}.npy", means)
        shutil.rmtree(staging / "raw")
        with pa.OSFile(str(staging / CAPTIONS_FILE), "wb") as sink:
            table = pa.table({"caption": groups["caption"].to_arrow()})
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        (staging / META_FILE).write_text(json.dumps({"rows": groups.height, "dim": bundle.embed_dim,
                                                     "shard_rows": shard_rows, "pairs": pairs.height}))
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _group_means(raw: Path, shard_rows: int, members: pl.Series, dim: int) -> np.ndarray:
    """Per caption group (``members``: each group's pair rows), the renormalised mean embedding → float32 [G, dim]."""
    counts = members.list.len().to_numpy().astype(np.int64)
    rows = members.explode().to_numpy().astype(np.int64)
    vectors = torch.from_numpy(_read_rows(raw, "pairs", shard_rows, rows, dim))
    owner = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    sums = torch.zeros(len(counts), dim).index_add_(0, owner, vectors)
    return F.normalize(sums / torch.from_numpy(counts).unsqueeze(1).float(), dim=-1).numpy()


def _publish(staging: Path, folder: Path) -> None:
    """Rename the complete entry into place; a same-key entry published meanwhile by another run wins."""
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / META_FILE).exists():
            raise
