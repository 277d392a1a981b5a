"""The listing of an image source and its fingerprint in one pass, a batch of rows at a time.

Folders and manifests (:func:`clipopt_core.data.manifest.source_batches`) are listed once, ``batch_rows``
rows at a time: each batch is written as a part of a local parquet file and fed to the fingerprint (each file's
stat signature → its cached content hash, :func:`~clipopt_core.data.manifest.fingerprint_rows`). Memory
is bounded by a batch (and, for class folders, the names of one folder), not by the source. The
listing rows and the fingerprint are those of :func:`clipopt_core.data.sources.scan_images` and
:func:`clipopt_core.data.manifest.source_fingerprint` on the whole source: the fingerprint hashes the
rows sorted by path, which class folders are by construction and a manifest usually is; a manifest
that is not sorted by path is hashed in a second pass that keeps its fingerprint rows (path, label,
caption, category, sha256) in a temporary parquet file and sorts them whole (polars columns, ~0.1 KB
per row; its files' facts are cached by then when there is a cache folder).

:func:`clipopt_core.data.sources.write_listing` writes the file under a temporary name and renames it
onto its target only when complete. docs/scaling.md, "Source listing in batches".
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from clipopt_core.data import manifest as mf
from clipopt_core.data.file_facts import DEFAULT_WORKERS
from clipopt_core.data.parquet_parts import PartsWriter
from clipopt_core.runtime.digest import FrameDigest

LISTING_COLUMNS = (*mf.LISTING_COLUMNS, "root")  # the columns written: scan_images' for folders and manifests


@dataclass(frozen=True)
class ListingSummary:
    """What a listing pass found: its ``rows`` and the source's ``fingerprint`` (24 hex digits)."""

    rows: int
    fingerprint: str


class SourceHash:
    """The fingerprint of a source's rows fed batch by batch: :func:`~clipopt_core.data.manifest.source_fingerprint`.

    Batches whose paths keep ascending are hashed as they come; after rows out of path order,
    :attr:`in_order` is false and only a ``spool`` (a folder where every batch's fingerprint rows are
    also written) gives the fingerprint, from those rows sorted whole.
    """

    def __init__(self, root: str, *, cache_dir: Path | str | None, workers: int, spool: Path | None) -> None:
        self.root, self.cache_dir, self.workers, self.spool = root, cache_dir, workers, spool
        self.hasher = FrameDigest(mf.FINGERPRINT_COLUMNS)
        self.parts: list[Path] = []
        self.last: str | None = None
        self.in_order = True

    def add(self, rows: pl.DataFrame) -> None:
        """Feed the next rows of the source (columns path, label, caption, category)."""
        if rows.is_empty():
            return
        table = mf.fingerprint_rows(rows, self.root, cache_dir=self.cache_dir, workers=self.workers)
        paths = rows["path"].fill_null("")
        ordered = paths.is_sorted() and (self.last is None or paths[0] >= self.last)
        self.last = table["path"][-1]
        if self.spool is not None:
            self.parts.append(self.spool / f"fingerprint-{len(self.parts):06d}.parquet")
            table.write_parquet(self.parts[-1])
        self.in_order = self.in_order and ordered
        if self.in_order:
            self.hasher.update(table)

    def hexdigest(self) -> str:
        """The fingerprint (24 hex digits) of every row fed; rows out of path order need a ``spool``."""
        if self.in_order:
            return self.hasher.hexdigest()[:24]
        if self.spool is None:
            raise RuntimeError(f"rows of {self.root!r} came out of path order; hash them with a spool folder")
        whole = pl.scan_parquet(self.parts).sort("path", maintain_order=True).collect()
        return mf.frame_hash(whole)[:24]


def file_source_fingerprint(location: str, layout: str, *, cache_dir: Path | str | None = None,
                            workers: int = DEFAULT_WORKERS, batch_rows: int = mf.LISTING_BATCH_ROWS) -> str:
    """:func:`~clipopt_core.data.manifest.source_fingerprint` of a folder or manifest source, listed in batches.

    ``layout``: ``folders`` or ``manifest`` (resolved, :func:`clipopt_core.data.sources.resolve_layout`).
    """
    with tempfile.TemporaryDirectory(prefix="source-hash-") as work:
        return list_file_source(location, layout, None, Path(work), cache_dir=cache_dir, workers=workers,
                                batch_rows=batch_rows).fingerprint


def list_file_source(location: str, layout: str, target: Path | None, work: Path, *,
                     cache_dir: Path | str | None = None, workers: int = DEFAULT_WORKERS,
                     batch_rows: int = mf.LISTING_BATCH_ROWS) -> ListingSummary:
    """One pass over a folder or manifest source (``layout`` resolved): its batches written to the parquet
    file ``target`` (columns :data:`LISTING_COLUMNS`, row groups of ``batch_rows``; ``None``: not written;
    :class:`~clipopt_core.data.parquet_parts.PartsWriter`) and fingerprinted. ``work``: an empty folder
    for the batches (one part each, joined into ``target`` at the end) and the fingerprint rows of a
    manifest out of path order (see :class:`SourceHash`)."""
    root = mf.source_root(location)
    digest = SourceHash(root, cache_dir=cache_dir, workers=workers, spool=None)
    writer = None if target is None else PartsWriter(target, dict.fromkeys(LISTING_COLUMNS, pl.String), work,
                                                      batch_rows)
    rows = 0
    for batch in mf.source_batches(location, layout, batch_rows=batch_rows):
        digest.add(batch)
        rows += batch.height
        if writer is not None:
            writer.write(batch.with_columns(pl.lit(root, dtype=pl.String).alias("root")).select(LISTING_COLUMNS))
    if writer is not None:
        writer.publish()
    if not digest.in_order:  # a manifest out of path order: a second pass, its fingerprint rows sorted whole
        digest = SourceHash(root, cache_dir=cache_dir, workers=workers, spool=work)
        for batch in mf.source_batches(location, layout, batch_rows=batch_rows):
            digest.add(batch)
    return ListingSummary(rows, digest.hexdigest())
