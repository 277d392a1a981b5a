"""Ingest of a listing in batches: memory bounded by a batch (plus fixed-width keys), not by the source.

The listing (:func:`clipopt_core.data.sources.scan_images` rows, a parquet file) is read
``batch_rows`` rows at a time. Each batch is checked (:func:`~clipopt_core.data.manifest.checked_with_facts`
for file rows, the shard checks for shard rows), assembled (:func:`~clipopt_core.data.manifest.assemble`)
and its accepted and rejected rows are written as parquet parts, joined into one file each at the end
by polars' streaming engine. The checks across rows see earlier batches through
:mod:`clipopt_core.data.ingest_state` (16 bytes per row, 20 per accepted row), so the result is the one
of a single batch: same rows, same order, same reasons, same data version. (One exception, ~n²/2⁸¹:
two different contents sharing their 80-bit ``image_id`` and a label are both kept when they fall in
different batches; one batch keeps the first.) Memory per batch: ~3 KB per listing row, plus the
listing's row group (polars writes 262,144 rows per group by default), which a slice decodes whole.

Rows are taken in the order a single pass takes them: the file rows of each root (roots in order of
first appearance), then every shard row. A listing of one kind and one root is read as it is; otherwise
each group is first copied to its own file by polars' streaming engine.

The outputs are written to temporary names beside ``accepted``/``rejected`` and renamed onto them only
when the whole listing is done: a failed or killed run leaves whatever was there before.
docs/scaling.md, "Ingest in batches".
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from clipopt_core.data import manifest as mf
from clipopt_core.data.file_facts import DEFAULT_WORKERS, Progress
from clipopt_core.data.ingest_state import ContentOwners, SeenKeys
from clipopt_core.data.parquet_parts import PartsWriter
from clipopt_core.runtime.digest import FrameDigest, content_columns

BATCH_ROWS = 16_384  # listing rows per batch: bounds the rows, facts and Python objects held (~3 KB per row)
ACCEPTED_SCHEMA = {"image_id": pl.String, "uri": pl.String, "path": pl.String, "label": pl.String,
                   "caption": pl.String, "category": pl.String, "source": pl.String, "sha256": pl.String,
                   "width": pl.Int64, "height": pl.Int64}
WEIGHT_SCHEMA = {"source_weight": pl.Float64}
REJECTED_SCHEMA = {"path": pl.String, "reason": pl.String, "detail": pl.String}


@dataclass(frozen=True)
class IngestSummary:
    """What a streamed ingest wrote: row counts and the accepted rows' ``frame_digest``."""

    accepted_rows: int
    rejected_rows: int
    digest: str


def ingest_to_files(listing: Path, accepted: Path, rejected: Path, *, batch_rows: int = BATCH_ROWS,
                    cache_dir: Path | str | None = None, workers: int = DEFAULT_WORKERS,
                    progress: Progress | None = None) -> IngestSummary:
    """Validate the rows of the parquet file ``listing`` into the parquet files ``accepted`` and ``rejected``.

    Args:
        listing: rows of :func:`~clipopt_core.data.sources.scan_images` (``root`` and the listing columns).
        accepted, rejected: local files, replaced only when the whole listing is done.
        batch_rows: listing rows validated together (files read per batch: at most that many).
        progress: ``progress(done, total)`` in listing rows, once per file read.

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
    digest = FrameDigest(content_columns(schema))  # the data version: frame_digest of the accepted rows
    file_keys, shard_keys, owners = SeenKeys(), SeenKeys(), ContentOwners()
    counts, read = [0, 0], 0
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=accepted.parent) as work:
        good = PartsWriter(accepted, schema, Path(work), batch_rows)
        bad = PartsWriter(rejected, REJECTED_SCHEMA, Path(work), batch_rows)
        for root, batch in _batches(listing, Path(work), batch_rows):
            step = None if progress is None else (lambda n, _t, done=read: progress(done + n, total))
            read += batch.height
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
            digest.update(part_accepted)
            counts[0] += part_accepted.height
            counts[1] += part.rejected.height
        if counts[0] == 0:
            raise mf.ManifestError(mf.no_usable_image(where, total, bad.rows()))
        good.publish()
        bad.publish()
    return IngestSummary(counts[0], counts[1], digest.hexdigest())


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
        part = scan
        if len(groups) > 1:  # one file per group, in the order a single pass takes them
            (work / "groups").mkdir(exist_ok=True)
            scan.filter(selection).sink_parquet(work / "groups" / f"{number}.parquet", row_group_size=batch_rows)
            part = pl.scan_parquet(work / "groups" / f"{number}.parquet")
        for start in range(0, part.select(pl.len()).collect().item(), batch_rows):
            yield root, part.slice(start, batch_rows).collect()  # reads the row groups of the slice only


def _checked_shard_rows(rows: pl.DataFrame, seen: SeenKeys) -> pl.DataFrame:
    """Shard rows (facts known) with a repeated path rejected: a path seen in any earlier shard row."""
    repeated = seen.mark(rows["path"].to_list()) & rows["reason"].is_null()
    return rows.with_columns(
        pl.when(repeated).then(pl.lit("duplicate_path")).otherwise("reason").alias("reason"),
        pl.when(repeated).then(pl.format("{} appears more than once in the shards", "path"))
        .otherwise("detail").alias("detail"))
