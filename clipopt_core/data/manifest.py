"""Image manifests: scan a source, validate every row and image, split by class.

A source is a folder (local path or fsspec URL) in one of two layouts:

* ``folders``: ``root/<label>/<image>``; the label is the folder name (``_`` → space);
* ``manifest``: ``root/manifest.parquet`` or ``root/manifest.csv`` with columns ``path``
  (relative to root), ``label`` and optional ``caption``, ``category``, ``source``.

Validated manifest columns: ``image_id`` (content hash prefix), ``uri`` (absolute),
``path``, ``label``, ``caption``, ``category`` (defaults to label), ``source``,
``sha256``, ``width``, ``height`` (and ``source_weight`` from a sources file that sets weights,
:mod:`clipopt_core.data.sources`). Rejected rows: ``path``, ``reason``, ``detail``.

Each file is read once, in a thread pool, and its facts (content hash, decode result) are kept in a
cache keyed by its signature (:mod:`clipopt_core.data.file_facts`); rows are assembled as columns.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import polars as pl

from clipopt_core.data.file_facts import DEFAULT_WORKERS, Progress, file_facts, is_local, protocol
from clipopt_core.data.ingest_state import ContentOwners, SeenKeys
from clipopt_core.runtime.digest import FrameDigest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg")
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("caption", "category", "source")
MANIFEST_NAMES = ("manifest.parquet", "manifest.csv")
FACT_COLUMNS = ("sha256", "width", "height", "reason", "detail")
LISTING_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)  # the columns of scan_source
FINGERPRINT_COLUMNS = ("path", "label", "caption", "category", "sha256")
LISTING_BATCH_ROWS = 16_384  # listing rows per batch (as ingest): bounds the rows and facts held, ~1.6 KB each


class ManifestError(ValueError):
    """The source cannot be turned into a manifest at all (message names the fix)."""


@dataclass(frozen=True)
class IngestResult:
    accepted: pl.DataFrame
    rejected: pl.DataFrame


def scan_source(root: str, layout: str = "auto", *, captions_only: bool = False) -> pl.DataFrame:
    """List the rows of a source without reading images: columns path, label, caption, category, source.

    ``captions_only``: an image-caption source (manifest with ``path`` and ``caption``); the
    caption doubles as the label so the same validation applies. The rows of :func:`source_batches`, whole.
    """
    batches = list(source_batches(root, layout, captions_only=captions_only))
    return pl.concat(batches) if batches else pl.DataFrame(schema=dict.fromkeys(LISTING_COLUMNS, pl.String))


def source_batches(root: str, layout: str = "auto", *, captions_only: bool = False,
                   batch_rows: int = LISTING_BATCH_ROWS) -> Iterator[pl.DataFrame]:
    """:func:`scan_source`'s rows, ``batch_rows`` at a time, in the same order (docs/scaling.md, "Source listing").

    Class folders are listed one folder at a time (a folder's names are held, sorted); a manifest file is
    read a slice at a time (a CSV is first converted to a temporary parquet file by polars' streaming
    engine; a remote manifest is downloaded first). Raises :class:`ManifestError` as :func:`scan_source`.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    root, manifest_name = _split_location(root)
    fs, base = fsspec.core.url_to_fs(root)
    fs.invalidate_cache(base)  # object stores: list afresh, not from an earlier call's cached listing
    if not fs.isdir(base):
        raise ManifestError(f"image source {root!r} is not a folder (or is unreachable)")
    if manifest_name is None:
        manifest_name = next((name for name in MANIFEST_NAMES if fs.exists(f"{base}/{name}")), None)
    if layout == "auto":
        layout = "manifest" if manifest_name else "folders"
    if layout == "manifest":
        if manifest_name is None:
            raise ManifestError(f"no {' or '.join(MANIFEST_NAMES)} in {root!r}")
        yield from _manifest_file_batches(fs, base, f"{root}/{manifest_name}", captions_only, batch_rows)
    elif layout == "folders":
        yield from _class_folder_batches(fs, base, batch_rows)
    else:
        raise ManifestError(f"unknown layout {layout!r}; use 'auto', 'folders' or 'manifest'")


def ingest(root: str, rows: pl.DataFrame, *, captions_only: bool = False, progress: Progress | None = None,
           workers: int = DEFAULT_WORKERS, cache_dir: Path | str | None = None) -> IngestResult:
    """Validate ``rows`` of a source: safe paths, labels, decodable images, duplicates.

    Never reads a path outside ``root``. The run goes on past bad rows; each lands in
    ``rejected`` with its reason. Raises :class:`ManifestError` when nothing is usable.
    Each distinct file is read once (``workers`` threads, :func:`~clipopt_core.data.file_facts.file_facts`;
    with ``cache_dir``, not at all when its facts are cached under the same signature).
    ``progress(done, total)`` is called for each file read.

    ``captions_only`` (rows from ``scan_source(..., captions_only=True)``): every (image, caption)
    pair is kept -- several captions per image (COCO/Flickr style) are several rows. Only a
    repeated (path, caption) pair is a duplicate (``duplicate_pair``); each image is read and
    decoded once; a file with the same bytes as an earlier one is the same image (its rows take
    the earlier path's ``uri``). Otherwise a path may appear once, and the same bytes under
    another label are rejected (``duplicate_content_other_label``).
    """
    return assemble(checked_with_facts(root, rows, captions_only=captions_only, progress=progress, workers=workers,
                                       cache_dir=cache_dir), captions_only=captions_only, where=root)


def checked_with_facts(root: str, rows: pl.DataFrame, *, captions_only: bool = False,
                       progress: Progress | None = None, workers: int = DEFAULT_WORKERS,
                       cache_dir: Path | str | None = None, seen: SeenKeys | None = None) -> pl.DataFrame:
    """``rows`` with their ``uri`` and the facts of their files (:data:`FACT_COLUMNS`) for :func:`assemble`.

    ``reason``/``detail`` hold the first problem of a row: its path or label (never read), else its image's.
    ``seen``: the keys of earlier batches of the same stream (:mod:`clipopt_core.data.ingest_stream`), so
    a path listed again in a later batch is a ``duplicate_path`` too; ``None``: ``rows`` are the whole source.
    """
    fs, base = fsspec.core.url_to_fs(root)
    guard = RootGuard(base)
    columns: dict[str, list[str | None]] = {"path": [], "label": [], "problem": [], "problem_detail": []}
    keys: list[str | None] = []
    for path, label in rows.select(pl.col("path").fill_null(""), "label").iter_rows():
        label_text = str(label or "").strip()
        problem = _row_problem(fs, base, path, label, captions_only, guard)
        keys.append(f"{root}\x00{path}\x00{label_text if captions_only else ''}" if problem is None else None)
        for name, value in zip(columns, (path, label_text or None, *(problem or (None, None)))):
            columns[name].append(value)
    # a usable path (pair) listed again: its file checks gave the same answer as the first time's
    for number in (seen or SeenKeys()).mark(keys).arg_true().to_list():
        path, label_text = columns["path"][number], columns["label"][number]
        columns["problem"][number], columns["problem_detail"][number] = (
            ("duplicate_pair", f"{path!r} with caption {label_text!r} listed more than once") if captions_only
            else ("duplicate_path", f"{path!r} listed more than once"))
    prefix = f"{base}/" if is_local(fs) else f"{protocol(fs)}://{base}/"
    checked = rows.with_columns(pl.Series(name, values, pl.String) for name, values in columns.items())
    readable = checked.filter(pl.col("problem").is_null())["path"].unique(maintain_order=True).to_list()
    facts = file_facts(root, readable, cache_dir=cache_dir, workers=workers, progress=progress).drop("signature")
    return (checked.join(facts, on="path", how="left", maintain_order="left")
            .with_columns(pl.coalesce("problem", "reason").alias("reason"),
                          pl.coalesce("problem_detail", "detail").alias("detail"),
                          (pl.lit(prefix) + pl.col("path")).alias("uri"))
            .drop("problem", "problem_detail"))


def assemble(frame: pl.DataFrame, *, captions_only: bool = False, where: str = "the source",
             owners: ContentOwners | None = None, weights: bool | None = None) -> IngestResult:
    """Accepted and rejected rows from rows with facts (``path``, ``label``, ``uri``, :data:`FACT_COLUMNS`, …).

    Row order is kept; the first row with some bytes owns them (its label, its path and ``uri``).
    Columnar throughout: no per-row Python objects, whatever the size of the source.
    ``owners`` (image sources): the images accepted from earlier batches of a stream; a row with the
    bytes of one of them is rejected under another label and left out under the same one, and the
    images accepted here are added to it. ``None``: ``frame`` is the whole source (raises
    :class:`ManifestError` when nothing is usable). ``weights``: whether ``source_weight`` is a column
    of the accepted rows (``None``: when any row has a weight).
    """
    frame = frame.with_row_index("row")
    for column in (*OPTIONAL_COLUMNS, "source_weight"):
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64 if column == "source_weight" else pl.String)
                                       .alias(column))
    good = frame.filter(pl.col("reason").is_null()).with_columns(
        pl.col(c).first().over("sha256").alias(f"owner_{c}") for c in ("label", "path", "uri"))
    earlier = (owners.owner_labels(good["sha256"]) if owners is not None and not captions_only
               else pl.repeat(None, good.height, dtype=pl.String, eager=True))
    good = good.with_columns(earlier.alias("earlier_owner")).with_columns(
        pl.coalesce("earlier_owner", "owner_label").alias("owner_label"))
    conflicts = (good.filter(pl.col("owner_label") != pl.col("label")) if not captions_only
                 else good.clear())
    conflicts = conflicts.with_columns(
        pl.lit("duplicate_content_other_label").alias("reason"),
        pl.format("same bytes as an image labelled '{}'", pl.col("owner_label")).alias("detail"))
    good = good.join(conflicts.select("row"), on="row", how="anti", maintain_order="left")
    if captions_only:
        good = good.with_columns(pl.col("owner_path").alias("path"), pl.col("owner_uri").alias("uri"))
    rejected = (pl.concat([frame.filter(pl.col("reason").is_not_null()).select("row", "path", "reason", "detail"),
                           conflicts.select("row", "path", "reason", "detail")])
                .sort("row").drop("row"))
    if good.height == 0 and owners is None:
        raise ManifestError(no_usable_image(where, frame.height, rejected))
    clean = [pl.col(c).str.strip_chars().replace("", None) for c in OPTIONAL_COLUMNS]
    weighted = good["source_weight"].is_not_null().any() if weights is None else weights
    accepted = good.filter(pl.col("earlier_owner").is_null()).with_columns(*clean).select(
        pl.col("sha256").str.slice(0, 20).alias("image_id"), "uri", "path", "label", "caption",
        pl.coalesce("category", "label").alias("category"), pl.col("source").fill_null("default"),
        "sha256", "width", "height", *(["source_weight"] if weighted else []))
    accepted = accepted.unique(subset=["image_id", "label"], keep="first", maintain_order=True)
    if owners is not None and not captions_only:
        owners.add(accepted)
    return IngestResult(accepted, rejected.cast({c: pl.String for c in rejected.columns}))


def no_usable_image(where: str, rows: int, rejected: pl.DataFrame | pl.LazyFrame) -> str:
    """The message of an ingest that accepted nothing: the rows and the rejections by reason."""
    reasons = (rejected.lazy().group_by("reason").len().sort(["len", "reason"], descending=[True, False])
               .collect().rows())
    return f"no usable image in {where!r} ({rows} rows; rejections: {reasons})"


def split_by_class(manifest: pl.DataFrame, *, val_fraction: float, test_fraction: float, seed: int = 0) -> pl.DataFrame:
    """Add a ``split`` column (train / val / test) with disjoint classes per split.

    A class's split depends only on ``(seed, label)``, so adding classes to the source
    never moves existing classes between splits (stable across scheduled retrains).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each in [0,1), sum < 1")

    def _split(label: str) -> str:
        draw = int(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest()[:12], 16) / 16**12
        if draw < test_fraction:
            return "test"
        return "val" if draw < test_fraction + val_fraction else "train"

    return manifest.with_columns(pl.col("label").map_elements(_split, return_dtype=pl.String).alias("split"))


def source_fingerprint(rows: pl.DataFrame, root: str, *, cache_dir: Path | str | None = None,
                       workers: int = DEFAULT_WORKERS) -> str:
    """Content fingerprint of a source: hash over (path, label, caption, category, file sha256).

    Changes when an image is added, removed, relabelled or its bytes change; a ``touch`` without a
    change leaves it as it was. Unreadable files hash as empty so the fingerprint still moves when
    they are fixed. Paths that escape the root (``..``, absolute, symlinks out) or are not regular
    files are never opened: they hash as empty too (:func:`ingest` rejects them). The file hashes
    come from :func:`~clipopt_core.data.file_facts.file_facts`: with ``cache_dir`` a file is read only
    when its signature (size, mtime, …) changed, so a tick over an unchanged source only stats files.
    :mod:`clipopt_core.data.listing` computes the same value batch by batch.
    """
    return frame_hash(fingerprint_rows(rows, root, cache_dir=cache_dir, workers=workers))[:24]


def fingerprint_rows(rows: pl.DataFrame, root: str, *, cache_dir: Path | str | None = None,
                     workers: int = DEFAULT_WORKERS) -> pl.DataFrame:
    """``rows`` as the fingerprint hashes them: :data:`FINGERPRINT_COLUMNS`, stably sorted by path (null → "")."""
    fs, base = fsspec.core.url_to_fs(source_root(root))
    paths = rows["path"].fill_null("").unique(maintain_order=True).to_list()
    guard = RootGuard(base)
    safe = [path for path in paths if _safe_to_read(fs, base, path, guard)]
    facts = file_facts(source_root(root), safe, cache_dir=cache_dir, workers=workers).select("path", "sha256")
    return (rows.select(pl.col("path").fill_null(""), "label", "caption", "category").sort("path", maintain_order=True)
            .join(facts, on="path", how="left", maintain_order="left").with_columns(pl.col("sha256").fill_null("")))


def frame_hash(frame: pl.DataFrame) -> str:
    """sha256 (hex) of a frame's column names and values as CSV, in row order (every column, in its order)."""
    digest = FrameDigest(frame.columns)
    digest.update(frame)
    return digest.hexdigest()


def class_stats(manifest: pl.DataFrame | pl.LazyFrame) -> dict[str, int]:
    """Counts shown to users: images, classes, singleton classes (unusable as retrieval queries).

    A lazy ``manifest`` (a scanned file) is counted by polars' streaming engine: memory grows with
    the classes, not the images.
    """
    sizes = manifest.lazy().group_by("label").len().collect(engine="streaming")
    return {
        "images": int(sizes["len"].sum()),
        "classes": sizes.height,
        "singleton_classes": int((sizes["len"] == 1).sum()),
        "sources": manifest.lazy().select(pl.col("source").n_unique()).collect(engine="streaming").item(),
    }


def _row_problem(fs: fsspec.AbstractFileSystem, base: str, path: str, label: object, captions_only: bool,
                 guard: RootGuard) -> tuple[str, str] | None:
    """First reason a row is unusable before its bytes are read, or ``None`` (a repeated path is checked after)."""
    if not path:
        return "missing_path", "empty path"
    if "\x00" in path:  # os.path raises ValueError on it; no real file has one
        return "invalid_path", f"{path!r} contains a NUL byte"
    if _escapes_lexically(path):
        return "path_escapes_root", f"{path!r} must be relative to the source root without '..'"
    if label is None or not str(label).strip():
        return ("empty_caption", "caption is empty") if captions_only else ("empty_label", "label is empty")
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not_an_image", f"extension not one of {IMAGE_EXTENSIONS}"
    full = f"{base}/{path}"
    if is_local(fs) and not guard.inside(full):
        return "path_escapes_root", f"{path!r} resolves outside the source root (symlink?)"
    if is_local(fs) and not fs.exists(full):  # elsewhere the facts' listing tells (no request per row)
        return "missing_file", f"{full} does not exist"
    if is_local(fs) and not os.path.isfile(full):  # a FIFO or device would block or never end
        return "not_a_regular_file", f"{full} is not a regular file"
    return None


def _escapes_lexically(path: str) -> bool:
    """Absolute, ``..``-climbing or URL-like (``s3:``, ``C:``) paths, before any filesystem access."""
    normal = posixpath.normpath(path.replace("\\", "/"))
    return posixpath.isabs(normal) or normal == ".." or normal.startswith("../") or ":" in path.split("/")[0]


def _safe_to_read(fs: fsspec.AbstractFileSystem, base: str, path: str, guard: RootGuard) -> bool:
    """Whether ``path`` is relative, stays inside ``base`` (symlinks resolved) and is a regular file."""
    if not path or "\x00" in path or _escapes_lexically(path):
        return False
    if not is_local(fs):
        return True
    full = f"{base}/{path}"
    return guard.inside(full) and os.path.isfile(full)


class RootGuard:
    """Tells whether local paths resolve inside ``base``, for one pass over a source.

    The real path of each folder is resolved once per pass (``realpath`` per file was most of a
    fingerprint's cost); a file that is itself a symlink is always resolved in full.
    """

    def __init__(self, base: str) -> None:
        self.real_root = os.path.realpath(base)
        self._folders: dict[str, str] = {}

    def inside(self, full: str) -> bool:
        folder, _, name = full.rpartition("/")
        if name in ("", ".", "..") or os.path.islink(full):
            real = os.path.realpath(full)
        else:
            if folder not in self._folders:
                self._folders[folder] = os.path.realpath(folder)
            real = f"{self._folders[folder]}/{name}"
        return real.startswith(self.real_root + os.sep)


def source_root(location: str) -> str:
    """The folder image paths are relative to: ``location`` itself, or a manifest file's folder."""
    return _split_location(location)[0]


def _split_location(location: str) -> tuple[str, str | None]:
    location = location.rstrip("/")
    if location.lower().endswith((".csv", ".parquet")):
        root, _, name = location.rpartition("/")
        return root, name
    return location, None


def _manifest_file_batches(fs: fsspec.AbstractFileSystem, base: str, location: str, captions_only: bool,
                           batch_rows: int) -> Iterator[pl.DataFrame]:
    """The rows of a manifest file, ``batch_rows`` at a time: a local parquet copy read a slice at a time."""
    name = location.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="manifest-file-") as work:
        local = f"{base}/{name}"
        if not is_local(fs):  # streamed to disk, never held in memory
            local = f"{work}/{name}"
            fs.get_file(f"{base}/{name}", local)
        if not name.endswith(".parquet"):  # CSV: every column as text, as read_csv(infer_schema_length=0)
            pl.scan_csv(local, infer_schema_length=0).sink_parquet(f"{work}/manifest.parquet", row_group_size=batch_rows)
            local = f"{work}/manifest.parquet"
        scan = pl.scan_parquet(local)
        columns = scan.collect_schema().names()
        required = ("path", "caption") if captions_only else REQUIRED_COLUMNS
        missing = [column for column in required if column not in columns]
        if missing:
            raise ManifestError(f"{location} lacks column(s) {missing}; required {list(required)}, "
                                f"optional {list(OPTIONAL_COLUMNS)}")
        present = {**{c: pl.col(c) for c in columns}, **({"label": pl.col("caption")} if captions_only else {})}
        select = [present.get(c, pl.lit(None, dtype=pl.String)).cast(pl.String).alias(c)
                  for c in LISTING_COLUMNS]
        for start in range(0, scan.select(pl.len()).collect().item(), batch_rows):
            yield scan.slice(start, batch_rows).select(select).collect()  # the row groups of the slice only


def _class_folder_batches(fs: fsspec.AbstractFileSystem, base: str, batch_rows: int) -> Iterator[pl.DataFrame]:
    """``<folder>/<file>`` image rows two levels under ``base`` in sorted path order, a folder listed at a time.

    Folders are taken in the order of ``name + "/"``, which is the order of the full paths.
    """
    pending: list[str] = []
    listed = 0
    for folder in sorted(_entries(fs, base, folders=True), key=lambda name: f"{name}/"):
        pending += [f"{folder}/{name}" for name in sorted(_entries(fs, f"{base}/{folder}", folders=False))
                    if name.lower().endswith(IMAGE_EXTENSIONS)]
        while len(pending) >= batch_rows:
            listed += batch_rows
            yield _folder_rows(pending[:batch_rows])
            pending = pending[batch_rows:]
    if pending:
        yield _folder_rows(pending)
    elif not listed:
        raise ManifestError(f"no images found in class folders under {base!r} (expected root/<label>/<image>)")


def _folder_rows(paths: list[str]) -> pl.DataFrame:
    labels = [path.split("/", 1)[0].replace("_", " ") for path in paths]
    empty = pl.lit(None, dtype=pl.String)
    return pl.DataFrame({"path": paths, "label": labels}, schema={"path": pl.String, "label": pl.String}).with_columns(
        empty.alias("caption"), empty.alias("category"), empty.alias("source"))


def _entries(fs: fsspec.AbstractFileSystem, path: str, folders: bool) -> list[str]:
    """Names of the entries of ``path`` that are folders (``folders``) or are not (local: symlinks followed)."""
    if is_local(fs):
        with os.scandir(path) as entries:
            return [entry.name for entry in entries if entry.is_dir() == folders]
    fs.invalidate_cache(path)  # a long-lived process (the sensor) must not see an earlier listing
    return [info["name"].rstrip("/").rsplit("/", 1)[-1] for info in fs.ls(path, detail=True)
            if (info["type"] == "directory") == folders and info["name"].rstrip("/") != path.rstrip("/")]
