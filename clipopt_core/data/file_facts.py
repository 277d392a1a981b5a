"""Facts about the files of an image source, each file read once: content hash and decode result.

A *fact* of a file is its SHA-256, and its ``width``/``height`` when it decodes, else the ``reason`` and
``detail`` of its rejection (:func:`~clipopt_core.data.images.decode_image`). Computing it reads the file
once; reads, hashes and decodes run in a thread pool (``workers``; file reads, hashing and Pillow's
decoders release the GIL), a bounded batch at a time so the bytes in flight do not grow with the
source; objects in a store are fetched a batch at a time with concurrent requests.

Facts are kept per source root under the cache folder, keyed by the file's *signature*:
``size:mtime_ns:ctime_ns:inode`` for a local file (what ``git`` trusts for its index), the size and ETag
(or modification time) from one listing for an object store. A file whose signature is unchanged is
never opened again, so the sensor's tick costs one ``stat`` per file; a file written again (same size,
new mtime) is re-hashed, and a ``touch`` without a change re-hashes to the same content. Nothing
downstream trusts a signature for identity: the manifest carries the content hash (``sha256``), which
is what :mod:`clipopt_core.train.identity` hashes. The cache is append-only (:class:`FactsCache`): a
call adds one part with the facts it computed and never loads or rewrites the others, so a batched
ingest holds the facts of one batch, not of the source.

Callers pass only paths already checked to stay inside the root (:mod:`clipopt_core.data.manifest`).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import fsspec
import polars as pl

from clipopt_core.data.images import ImageRejected, decode_image

# one thread per core: decoding and hashing are CPU work (more threads measured slower on 2 cores,
# docs/scaling.md); object-store latency is hidden by batched concurrent fetches, not by threads
DEFAULT_WORKERS = max(1, min(32, os.cpu_count() or 1))
BATCH_FILES = 4096  # files read per batch: bounds the bytes in flight and the futures held
REMOTE_BATCH_FILES = 256  # objects fetched per request batch from an object store: bounds the bytes held
FACT_SCHEMA = {"path": pl.String, "signature": pl.String, "sha256": pl.String, "width": pl.Int64,
               "height": pl.Int64, "reason": pl.String, "detail": pl.String}
FACTS_FOLDER = "source_facts"
PART_ROW_GROUP = 8192  # rows per row group of a facts part: what a path-range lookup reads at least
Progress = Callable[[int, int], None]


def read_fact(data: bytes, name: str) -> tuple[str, int | None, int | None, str | None, str | None]:
    """``(sha256, width, height, reason, detail)`` of one file's bytes; ``name`` names it in messages."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        width, height = decode_image(data, name=name).size
    except ImageRejected as exc:
        return digest, None, None, exc.reason, str(exc)
    return digest, width, height, None, None


def parallel_map(function: Callable, items: Iterable, workers: int) -> Iterable:
    """``map(function, items)`` in order; on a thread pool of ``workers`` when above 1."""
    if workers <= 1:
        yield from map(function, items)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        yield from pool.map(function, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class FactsCache:
    """The facts of one source root: ``<cache_dir>/source_facts/<sha256(root)[:24]>/part-*.parquet``.

    ``cache_dir`` ``None``: nothing is kept (every call reads every file). Append-only: :meth:`add`
    writes the facts of one call as a new part (sorted by path, temp + rename), so a reader never
    sees a partial part and two writers at once never lose each other's facts. :meth:`lookup` scans
    the parts for the wanted ``(path, signature)`` pairs only, filtered to the wanted paths' range:
    a path-sorted listing (class folders) read in batches reads only the row groups of each batch's
    range (parquet statistics). Parts accumulate, one per call that read files (a changed file adds
    its new fact; the old one is never matched again); deleting the folder compacts it at the cost
    of one re-read. A damaged part is deleted (its files are hashed again), never a failed run.
    """

    def __init__(self, cache_dir: Path | str | None, root: str) -> None:
        key = hashlib.sha256(root.encode()).hexdigest()[:24]
        self.folder = Path(cache_dir) / FACTS_FOLDER / key if cache_dir is not None else None
        self.legacy = Path(cache_dir) / FACTS_FOLDER / f"{key}.parquet" if cache_dir is not None else None

    def parts(self) -> list[Path]:
        """The parts, oldest first (a whole table written by an earlier release counts as the oldest)."""
        if self.folder is None:
            return []
        found = sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []
        return ([self.legacy] if self.legacy is not None and self.legacy.exists() else []) + found

    def lookup(self, wanted: pl.DataFrame) -> pl.DataFrame:
        """The cached facts (``FACT_SCHEMA``, one row per path) of ``wanted`` (``path``, ``signature``)."""
        parts = self.parts()
        wanted = wanted.filter(pl.col("signature").is_not_null())
        if not parts or wanted.is_empty():
            return pl.DataFrame(schema=FACT_SCHEMA)
        try:
            return self._scan(parts, wanted)
        except Exception:  # a damaged part: delete it (its files are read again) and use the others
            healthy = [part for part in parts if self._readable(part)]
            return self._scan(healthy, wanted) if healthy else pl.DataFrame(schema=FACT_SCHEMA)

    @staticmethod
    def _readable(part: Path) -> bool:
        try:
            pl.read_parquet(part, columns=["path", "signature"])
            return True
        except Exception:
            part.unlink(missing_ok=True)
            return False

    @staticmethod
    def _scan(parts: list[Path], wanted: pl.DataFrame) -> pl.DataFrame:
        low, high = wanted["path"].min(), wanted["path"].max()
        return (pl.scan_parquet(parts).select(list(FACT_SCHEMA)).cast(FACT_SCHEMA)  # type: ignore[arg-type]
                .filter(pl.col("path").is_between(pl.lit(low), pl.lit(high)))
                .join(wanted.lazy().select("path", "signature"), on=["path", "signature"], how="semi")
                .unique("path", keep="any").collect())  # one path in two parts: the same signature, the same fact

    def add(self, facts: pl.DataFrame) -> None:
        """Keep ``facts`` (rows without a signature are never looked up, so they are left out)."""
        facts = facts.filter(pl.col("signature").is_not_null())
        if self.folder is None or facts.is_empty():
            return
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        write_atomically(self.folder / name,
                         lambda path: facts.sort("path").write_parquet(path, row_group_size=PART_ROW_GROUP))


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` next to ``path``, then rename onto it: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def signatures(fs: fsspec.AbstractFileSystem, base: str, paths: Sequence[str]) -> list[str | None]:
    """A change-detecting signature per path (``None``: gone or unreadable), without opening any file.

    Object stores: one listing of each folder that holds one of ``paths`` (a batch of a path-sorted
    listing lists its few folders, not the whole source)."""
    if is_local(fs):
        return [_local_signature(f"{base}/{path}") for path in paths]
    found: dict[str, dict] = {}
    for folder in sorted({posixpath.dirname(path) for path in paths}):  # one listing per folder, not per file
        where = f"{base}/{folder}" if folder else base
        fs.invalidate_cache(where)  # a long-lived process (the sensor) must not see an earlier listing
        try:
            listing = fs.ls(where, detail=True)  # 1 request per 1,000 objects on S3
        except FileNotFoundError:
            continue
        found.update((info["name"].rstrip("/"), info) for info in listing if info.get("type") != "directory")
    result = []
    for path in paths:
        info = found.get(f"{base}/{path}".rstrip("/"))
        stamp = None if info is None else (info.get("ETag") or info.get("etag") or info.get("LastModified")
                                          or info.get("mtime") or info.get("created"))
        result.append(None if info is None else f"{info.get('size')}:{stamp}")
    return result


def _local_signature(full: str) -> str | None:
    try:
        st = os.stat(full)
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def file_facts(root: str, paths: Sequence[str], *, cache_dir: Path | str | None = None,
               workers: int = DEFAULT_WORKERS, progress: Progress | None = None) -> pl.DataFrame:
    """Facts (``FACT_SCHEMA``) of each distinct path under ``root``, reading only files the cache lacks.

    A file that cannot be read has a null ``sha256`` and reason ``unreadable`` (``missing_file`` when it
    has no signature: not listed, or gone). ``progress(done, total)``
    is called in order for each file that is read. The cache gains every fact computed (one new part).
    """
    fs, base = fsspec.core.url_to_fs(root)
    distinct = list(dict.fromkeys(paths))
    wanted = pl.DataFrame({"path": distinct, "signature": signatures(fs, base, distinct)},
                          schema={"path": pl.String, "signature": pl.String})
    cache = FactsCache(cache_dir, root)
    hits = cache.lookup(wanted)
    missing = wanted.join(hits.select("path"), on="path", how="anti")["path"].to_list()
    fresh = read_facts(fs, base, missing, dict(zip(wanted["path"], wanted["signature"])), workers, progress)
    cache.add(fresh)
    return pl.concat([hits, fresh])


def read_facts(fs: fsspec.AbstractFileSystem, base: str, paths: Sequence[str], signature_of: dict[str, str | None],
               workers: int, progress: Progress | None = None) -> pl.DataFrame:
    """Read, hash and decode ``paths`` into a facts frame, a batch at a time.

    Local files: each thread reads, hashes and decodes its file (:data:`BATCH_FILES` per batch). Object
    stores: a batch of :data:`REMOTE_BATCH_FILES` is fetched with one ``fs.cat`` (concurrent requests
    inside fsspec's event loop, which threads calling ``cat_file`` one by one would serialise), then
    hashed and decoded on ``workers`` threads.
    """
    local = is_local(fs)
    columns: list[list] = [[] for _ in range(5)]
    done = 0
    size = BATCH_FILES if local else REMOTE_BATCH_FILES
    for start in range(0, len(paths), size):
        batch = paths[start:start + size]
        blobs = {} if local else _fetch(fs, base, [p for p in batch if signature_of.get(p) is not None])

        def one(path: str) -> tuple[str | None, int | None, int | None, str | None, str | None]:
            if signature_of.get(path) is None:  # not in the listing (object stores) or gone since the scan
                return None, None, None, "missing_file", f"{base}/{path} does not exist"
            try:
                data = fs.cat_file(f"{base}/{path}") if local else blobs[path]
                if isinstance(data, BaseException):
                    raise data
            except OSError as exc:  # permissions, a file removed meanwhile: this row only, not the run
                return None, None, None, "unreadable", f"{type(exc).__name__}: {exc}"
            return read_fact(data, path)

        for fact in parallel_map(one, batch, workers):
            for column, value in zip(columns, fact):
                column.append(value)
            if progress:
                progress(done, len(paths))
            done += 1
    return pl.DataFrame({"path": list(paths), "signature": [signature_of.get(p) for p in paths],
                         **dict(zip(("sha256", "width", "height", "reason", "detail"), columns))}, schema=FACT_SCHEMA)


def _fetch(fs: fsspec.AbstractFileSystem, base: str, paths: Sequence[str]) -> dict[str, bytes | BaseException]:
    """``{path: bytes or the error reading it}`` of ``paths`` under ``base``, fetched together."""
    if not paths:
        return {}
    fetched = fs.cat([f"{base}/{path}" for path in paths], on_error="return")
    by_full = {key.split("://", 1)[-1]: value for key, value in fetched.items()}
    return {path: by_full.get(f"{base}/{path}", FileNotFoundError(f"{base}/{path}")) for path in paths}


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's main protocol name (``file``, ``s3``, …)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return protocol(fs) in ("file", "local")
