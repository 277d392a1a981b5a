"""Content digests of tables: what data versions and stage identities hash (docs/method.md#identity).

A frame's digest is the sha256 of its column names (sorted, location columns left out) and its rows
serialised as CSV in those columns, in row order. Rows are fed in slices, so a frame fed batch by
batch (:class:`FrameDigest`, e.g. while ingest writes its manifest), a lazy parquet scan and the
collected frame all give the same digest, in memory bounded by one slice. Stable across processes
and polars versions (unlike ``hash_rows``). No torch here: ingest uses it too.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import polars as pl

# where a row lives, not what it is: moving the same data elsewhere keeps its digest
LOCATION_COLUMNS = frozenset({"uri", "path", "root"})
SLICE_ROWS = 100_000


def content_columns(columns: Sequence[str]) -> list[str]:
    """The columns a content digest hashes: sorted, :data:`LOCATION_COLUMNS` left out."""
    return sorted(c for c in columns if c not in LOCATION_COLUMNS)


class FrameDigest:
    """sha256 of ``columns`` (in the order given) and the rows of every frame passed to :meth:`update`,
    in order, as if they were one frame: :func:`frame_digest` with :func:`content_columns`, or any columns."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self._digest = hashlib.sha256(",".join(self.columns).encode())

    def update(self, frame: pl.DataFrame | pl.LazyFrame) -> None:
        """Feed ``frame``'s rows (it must have :attr:`columns`), :data:`SLICE_ROWS` at a time."""
        lazy = frame.lazy().select(self.columns)
        for start in range(0, frame_rows(frame), SLICE_ROWS):
            self._digest.update(lazy.slice(start, SLICE_ROWS).collect().write_csv(include_header=False).encode())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def frame_digest(frame: pl.DataFrame | pl.LazyFrame | None) -> str:
    """sha256 of a frame's content (row order kept, location columns left out); ``"none"`` for ``None``.

    A lazy frame (e.g. a parquet scan) is read one slice at a time and gives the collected frame's digest.
    """
    if frame is None:
        return "none"
    digest = FrameDigest(content_columns(frame.lazy().collect_schema().names()))
    digest.update(frame)
    return digest.hexdigest()


def frame_rows(frame: pl.DataFrame | pl.LazyFrame) -> int:
    """Row count of a frame; for a lazy parquet scan, from the files' metadata (nothing is read whole)."""
    return frame.height if isinstance(frame, pl.DataFrame) else int(frame.select(pl.len()).collect().item())
