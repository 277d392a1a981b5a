"""Ingest of a listing in batches: memory bounded by a batch (plus fixed-width keys), not by the source.

The listing (:func:`clipopt_core.data.sources.scan_images` rows, a parquet file) is read
``batch_rows`` rows at a time. Each batch is checked (:func:`~clipopt_core.data.manifest.checked_with_facts`
for file rows, the shard checks for shard rows), assembled (:func:`~clipopt_core.data.manifest.assemble`)
and its accepted and rejected rows are appended to two parquet writers. The checks across rows see
earlier batches through :mod:`clipopt_core.data.ingest_state` (16 bytes per row, 20 per accepted row),
so the result is the one of a single batch: same rows, same order, same reasons, same data version.

Rows are taken in the order a single pass takes them: the file rows of each root (roots in order of
first appearance), then every shard row. A listing of one kind and one root is read as it is; otherwise
each group is first copied to its own file by polars' streaming engine.

The outputs are written to temporary names beside ``accepted``/``rejected`` and renamed onto them only
when the whole listing is done: a failed or killed run leaves whatever was there before.
docs/scaling.md, "Ingest in batches".
"""
from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from clipopt_core.data import manifest as mf
from clipopt_core.data.file_facts import DEFAULT_WORKERS, Progress
from clipopt_core.data.ingest_state import ContentOwners, SeenKeys, StreamDigest

BATCH_ROWS = 65_536  # listing rows per batch: bounds the rows, facts and Python objects held at once
ACCEPTED_SCHEMA = {"image_id": pl.String, "uri": pl.String, "path": pl.String, "label": pl.String,
                   "caption": pl.String, "category": pl.String, "source": pl.String, "sha256": pl.String,
                   "width": pl.Int64, "height": pl.Int64}
WEIGHT_SCHEMA = {"source_weight": pl.Float64}
REJECTED_SCHEMA = {"path": pl.String, "reason": pl.String, "detail": pl.String}


@dataclass(frozen=True)
class IngestSummary:
    """What a streamed ingest wrote: row counts and the accepted rows' ``frame_digest`` (``""`` without
    ``digest_leave_out``)."""

    accepted_rows: int
    rejected_rows: int
    digest: str


def ingest_to_files(listing: Path, accepted: Path, rejected: Path, *, batch_rows: int = BATCH_ROWS,
                    cache_dir: Path | str | None = None, workers: int = DEFAULT_WORKERS,
                    progress: Progress | None = None,
                    digest_leave_out: Collection[str] | None = None) -> IngestSummary:
    """Validate the rows of the parquet file ``listing`` into the parquet files ``accepted`` and ``rejected``.

    Args:
        listing: rows of :func:`~clipopt_core.data.sources.scan_images` (``root`` and the listing columns).
        accepted, rejected: local files, replaced only when the whole listing is done.
        batch_rows: listing rows validated together (files read per batch: at most that many).
        progress: ``progress(done, total)`` in listing rows, once per file read.
        digest_leave_out: compute ``frame_digest`` of the accepted rows leaving out these columns
            (pass :data:`clipopt_core.train.identity.LOCATION_COLUMNS`).

    Raises :class:`~clipopt_core.data.manifest.ManifestError` when no row is usable (nothing is written).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    scan = _with_fact_columns(pl.scan_parquet(listing))
    names = scan.collect_schema().names()
    weighted = "source_weight" in names and scan.select(pl.col("source_weight").is_not_null().any()).collect().item()
    schema = {**ACCEPTED_SCHEMA, **(WEIGHT_SCHEMA if weighted else {})}
    total = scan.select(pl.len()).collect().item()
    where = scan.select(pl.col("root").first()).collect().item() if total else "the source"
    digest = StreamDigest(list(schema), digest_leave_out) if digest_leave_out is not None else None
    file_keys, shard_keys, owners = SeenKeys(), SeenKeys(), ContentOwners()
    counts = [0, 0]
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=accepted.parent) as work, \
            _Writer(accepted, schema) as good, _Writer(rejected, REJECTED_SCHEMA) as bad:
        for root, batch in _batches(listing, Path(work), batch_rows):
            done = counts[0] + counts[1]
            step = None if progress is None else (lambda n, _t, done=done: progress(done + n, total))
            if root is None:
                checked = _checked_shard_rows(batch.drop("root"), shard_keys)
            else:
                rows = batch.drop("root", "uri", *(c for c in mf.FACT_COLUMNS if c in batch.columns))
                checked = mf.checked_with_facts(root, rows, progress=step, workers=workers, cache_dir=cache_dir,
                                                seen=file_keys)
            part = mf.assemble(checked, where=where, owners=owners, weights=weighted)
            part_accepted = part.accepted.select(list(schema)).cast(schema)  # type: ignore[arg-type]
            good.write(part_accepted)
            bad.write(part.rejected.select(list(REJECTED_SCHEMA)))
            if digest is not None:
                digest.update(part_accepted)
            counts[0] += part_accepted.height
            counts[1] += part.rejected.height
        if counts[0] == 0:
            bad.close()
            raise mf.ManifestError(mf.no_usable_image(where, total, pl.scan_parquet(bad.temporary)))
        good.publish()
        bad.publish()
    return IngestSummary(counts[0], counts[1], digest.hexdigest() if digest is not None else "")


def _with_fact_columns(scan: pl.LazyFrame) -> pl.LazyFrame:
    """File rows have neither ``uri`` nor ``reason`` yet (shard rows have one of them)."""
    names = scan.collect_schema().names()
    return scan.with_columns(pl.lit(None, dtype=pl.String).alias(name) for name in ("uri", "reason")
                             if name not in names)


def _batches(listing: Path, work: Path, batch_rows: int) -> Iterator[tuple[str | None, pl.DataFrame]]:
    """``(root, rows)`` batches: each root's file rows in order of first appearance, then the shard rows
    (root ``None``)."""
    scan = _with_fact_columns(pl.scan_parquet(listing))
    in_shard = pl.col("uri").is_not_null() | pl.col("reason").is_not_null()
    roots = (scan.filter(~in_shard).select(pl.col("root").unique(maintain_order=True))
             .collect(engine="streaming")["root"].to_list())
    groups: list[tuple[str | None, pl.Expr]] = [(root, ~in_shard & (pl.col("root") == root)) for root in roots]
    if scan.filter(in_shard).select(pl.len()).collect().item():
        groups.append((None, in_shard))
    for number, (root, selection) in enumerate(groups):
        path = listing
        if len(groups) > 1:  # one file per group, in the order a single pass takes them
            path = work / f"group-{number}.parquet"
            scan.filter(selection).sink_parquet(path, row_group_size=batch_rows)
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield root, _with_fact_columns(pl.from_arrow(record_batch).lazy()).collect()  # type: ignore[union-attr]
        if path != listing:
            path.unlink()


def _checked_shard_rows(rows: pl.DataFrame, seen: SeenKeys) -> pl.DataFrame:
    """Shard rows (facts known) with a repeated path rejected: a path seen in any earlier shard row."""
    repeated = seen.mark(rows["path"].to_list()) & rows["reason"].is_null()
    return rows.with_columns(
        pl.when(repeated).then(pl.lit("duplicate_path")).otherwise("reason").alias("reason"),
        pl.when(repeated).then(pl.format("{} appears more than once in the shards", "path"))
        .otherwise("detail").alias("detail"))


class _Writer:
    """A parquet file written a frame at a time under a temporary name; :meth:`publish` renames it."""

    def __init__(self, final: Path, schema: dict[str, pl.DataType]) -> None:
        self.final, self.schema = final, schema
        self.temporary = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex}")
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _Writer:
        self.writer = pq.ParquetWriter(self.temporary, pl.DataFrame(schema=self.schema).to_arrow().schema)
        return self

    def write(self, frame: pl.DataFrame) -> None:
        if frame.height and self.writer is not None:
            self.writer.write_table(frame.cast(self.schema).to_arrow())  # type: ignore[arg-type]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def publish(self) -> None:
        self.close()
        os.replace(self.temporary, self.final)

    def __exit__(self, *_: object) -> None:
        self.close()
        self.temporary.unlink(missing_ok=True)
