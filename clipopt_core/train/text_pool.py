"""Caption pools for mining (docs/method.md#mining): read chunk by chunk, texts looked up by pool id.

A pool is an ordered sequence of distinct texts; pool id ``i`` is the ``i``-th text. Mining embeds
it ``chunk_size`` texts at a time and, at the end, needs the texts of the ≤ N·k pool ids it kept
(:class:`TextPool`). Two kinds:

* :class:`InMemoryPool`: a Python list, deduplicated here with
  :func:`clipopt_core.data.captions.dedupe_texts` (whitespace-normalised, non-empty, first-seen
  order) — for small pools and callers that build the pool in code.
* :class:`ParquetPool`: one string column of a local parquet file, read in record batches and never
  held whole, so memory is bounded by one chunk and one record batch whatever the pool size. It does
  **not** deduplicate (that would need every text at once): the file must already hold the distinct,
  whitespace-normalised texts, as the ``caption_corpus`` asset stores ``caption_pool``'s output. Each
  chunk is checked cheaply as it is read (no null or empty text, no text that whitespace
  normalisation would change, no repeat within the chunk); a repeat far apart in the file is not
  detected and would make an image keep the same caption twice.

:func:`open_stored_pool` opens a pool stored in an :class:`ArtifactStore`: in place on a local store,
from a local copy of the object on S3 (one consistent snapshot for the whole run).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Protocol

import pyarrow.parquet as pq

from clipopt_core.data.captions import dedupe_texts
from clipopt_core.runtime.storage import ArtifactStore


class TextPool(Protocol):
    """An ordered pool of distinct texts, read chunk by chunk (pool id = position)."""

    def __len__(self) -> int: ...

    def chunks(self, size: int) -> Iterator[list[str]]:
        """The texts in pool order, ``size`` at a time (the last chunk may be shorter)."""
        ...

    def texts(self, ids: Sequence[int]) -> list[str]:
        """The texts of pool ``ids``, in the order given (repeats allowed)."""
        ...


def _check_ids(ids: Sequence[int], size: int, where: str) -> None:
    """Raise when an id is outside ``[0, size)``."""
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise IndexError(f"pool ids {bad[:5]} outside the {size} texts of {where}")


class InMemoryPool:
    """A pool held as a list: ``texts`` deduplicated by :func:`dedupe_texts` (today's mining pool)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._texts = dedupe_texts(list(texts))

    def __len__(self) -> int:
        return len(self._texts)

    def chunks(self, size: int) -> Iterator[list[str]]:
        for start in range(0, len(self._texts), size):
            yield self._texts[start:start + size]

    def texts(self, ids: Sequence[int]) -> list[str]:
        _check_ids(ids, len(self._texts), "the in-memory pool")
        return [self._texts[i] for i in ids]


class ParquetPool:
    """The pool in column ``column`` of the local parquet file ``path``, read by record batches.

    The file is opened once: both the chunked pass and the id lookup read that one open file, so a
    file replaced meanwhile (an atomic rename) does not mix two pools; a pool opened afterwards reads
    the new file. Use as a context manager (or call :meth:`close`).

    Args:
        path: a local parquet file (see :func:`open_stored_pool` for an artifact store).
        column: the string column holding the texts, one distinct text per row (module docstring).
        batch_rows: rows decoded at a time by the id lookup (memory bound of :meth:`texts`).
    """

    def __init__(self, path: str | Path, column: str = "text", *, batch_rows: int = 65536) -> None:
        self.path, self.column, self.batch_rows = Path(path), column, batch_rows
        self._file = pq.ParquetFile(self.path)
        names = self._file.schema_arrow.names
        if column not in names:
            self._file.close()
            raise ValueError(f"caption pool {self.path}: no column {column!r} (columns: {names}); "
                             "pass the column that holds the pool texts")
        metadata = self._file.metadata
        self._group_rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]

    def __len__(self) -> int:
        return sum(self._group_rows)

    def __enter__(self) -> ParquetPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def chunks(self, size: int) -> Iterator[list[str]]:
        """Exactly ``size`` texts per chunk (the last one shorter), whatever the file's row groups; each
        chunk checked as the module docstring says."""
        pending: list[str] = []
        start = 0
        for batch in self._file.iter_batches(batch_size=size, columns=[self.column]):
            pending.extend(batch.column(0).to_pylist())
            while len(pending) >= size:
                chunk, pending = pending[:size], pending[size:]
                yield self._checked(chunk, start)
                start += size
        if pending:
            yield self._checked(pending, start)

    def texts(self, ids: Sequence[int]) -> list[str]:
        """Texts of ``ids``: only the row groups holding one of them are read, a record batch at a time."""
        _check_ids(ids, len(self), f"{self.path} ({self.column!r})")
        found: dict[int, str] = {}
        wanted = sorted(set(ids))
        position, group_start = 0, 0
        for group, rows in enumerate(self._group_rows):
            group_end = group_start + rows
            if position < len(wanted) and wanted[position] < group_end:
                position = self._read_group(group, group_start, wanted, position, found)
            group_start = group_end
        return [found[i] for i in ids]

    def _read_group(self, group: int, group_start: int, wanted: list[int], position: int, found: dict[int, str]) -> int:
        """Put the texts of ``wanted[position:]`` that lie in row group ``group`` into ``found``; returns the
        position of the first wanted id past the group."""
        batch_start = group_start
        for batch in self._file.iter_batches(batch_size=self.batch_rows, row_groups=[group], columns=[self.column]):
            batch_end = batch_start + batch.num_rows
            local = []
            while position < len(wanted) and wanted[position] < batch_end:
                local.append(wanted[position])
                position += 1
            if local:
                values = batch.column(0).take([i - batch_start for i in local]).to_pylist()
                found.update(zip(local, values))
            batch_start = batch_end
        return position

    def _checked(self, chunk: list[str], start: int) -> list[str]:
        """``chunk`` (rows ``start``…) when every text is a distinct, non-empty, whitespace-normalised string."""
        for offset, text in enumerate(chunk):
            if not isinstance(text, str) or not text or " ".join(text.split()) != text:
                raise ValueError(f"caption pool {self.path} row {start + offset}: {text!r} is not a non-empty, "
                                 "whitespace-normalised text; write the pool with "
                                 "clipopt_core.data.captions.dedupe_texts (the caption_corpus asset does)")
        seen: set[str] = set()
        for offset, text in enumerate(chunk):
            if text in seen:
                raise ValueError(f"caption pool {self.path} row {start + offset}: {text!r} repeats an earlier text; "
                                 "the pool must hold distinct texts (deduplicate it with dedupe_texts)")
            seen.add(text)
        return chunk


@contextmanager
def open_stored_pool(store: ArtifactStore, key: str, column: str = "text", *,
                     workdir: Path | None = None) -> Iterator[ParquetPool]:
    """The parquet pool at ``key`` of ``store``: read in place on a local store; on S3 first copied into a
    temporary folder under ``workdir`` (default: the system temp folder), removed on exit."""
    if store.is_local:
        with ParquetPool(store.path(key), column) as pool:
            yield pool
        return
    with tempfile.TemporaryDirectory(dir=workdir, prefix="caption-pool-") as folder:
        local = Path(folder) / "pool.parquet"
        store.get_file(key, local)
        with ParquetPool(local, column) as pool:
            yield pool
