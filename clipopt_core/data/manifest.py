"""Image manifests: scan a source, validate every row and image, split by class.

A source is a folder (local path or fsspec URL) in one of two layouts:

* ``folders``: ``root/<label>/<image>``; the label is the folder name (``_`` → space);
* ``manifest``: ``root/manifest.parquet`` or ``root/manifest.csv`` with columns ``path``
  (relative to root), ``label`` and optional ``caption``, ``category``, ``source``.

Validated manifest columns: ``image_id`` (content hash prefix), ``uri`` (absolute),
``path``, ``label``, ``caption``, ``category`` (defaults to label), ``source``,
``sha256``, ``width``, ``height``. Rejected rows: ``path``, ``reason``, ``detail``.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from typing import Callable

import fsspec
import polars as pl

from clipopt_core.data.images import ImageRejected, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg")
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("caption", "category", "source")
MANIFEST_NAMES = ("manifest.parquet", "manifest.csv")


class ManifestError(ValueError):
    """The source cannot be turned into a manifest at all (message names the fix)."""


@dataclass(frozen=True)
class IngestResult:
    accepted: pl.DataFrame
    rejected: pl.DataFrame


def scan_source(root: str, layout: str = "auto", *, captions_only: bool = False) -> pl.DataFrame:
    """List the rows of a source without reading images: columns path, label, caption, category, source.

    ``captions_only``: an image-caption source (manifest with ``path`` and ``caption``); the
    caption doubles as the label so the same validation applies.
    """
    root, manifest_name = _split_location(root)
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise ManifestError(f"image source {root!r} is not a folder (or is unreachable)")
    if manifest_name is None:
        manifest_name = next((name for name in MANIFEST_NAMES if fs.exists(f"{base}/{name}")), None)
    if layout == "auto":
        layout = "manifest" if manifest_name else "folders"
    if layout == "manifest":
        if manifest_name is None:
            raise ManifestError(f"no {' or '.join(MANIFEST_NAMES)} in {root!r}")
        return _read_manifest_file(fs, base, f"{root}/{manifest_name}", captions_only)
    if layout == "folders":
        return _scan_class_folders(fs, base)
    raise ManifestError(f"unknown layout {layout!r}; use 'auto', 'folders' or 'manifest'")


def ingest(root: str, rows: pl.DataFrame, *, captions_only: bool = False,
           progress: Callable[[int, int], None] | None = None) -> IngestResult:
    """Validate ``rows`` of a source: safe paths, labels, decodable images, duplicates.

    Never reads a path outside ``root``. The run goes on past bad rows; each lands in
    ``rejected`` with its reason. Raises :class:`ManifestError` when nothing is usable.

    ``captions_only`` (rows from ``scan_source(..., captions_only=True)``): every (image, caption)
    pair is kept -- several captions per image (COCO/Flickr style) are several rows. Only a
    repeated (path, caption) pair is a duplicate (``duplicate_pair``); each image is read and
    decoded once; a file with the same bytes as an earlier one is the same image (its rows take
    the earlier path's ``uri``). Otherwise a path may appear once, and the same bytes under
    another label are rejected (``duplicate_content_other_label``).
    """
    fs, base = fsspec.core.url_to_fs(root)
    accepted: list[dict] = []
    rejected: list[dict] = []
    seen: set[tuple[str, str]] = set()
    images: dict[str, tuple[str, tuple[int, int]] | tuple[str, str]] = {}  # path -> (digest, size) | (reason, detail)
    content_owner: dict[str, tuple[str, str]] = {}  # digest -> (first path, its label)
    for number, row in enumerate(rows.iter_rows(named=True)):
        if progress:
            progress(number, rows.height)
        path = str(row["path"] or "")
        label = str(row["label"] or "").strip()
        key = (path, label if captions_only else "")
        reason = _row_problem(fs, base, path, row["label"], key in seen, captions_only)
        if reason:
            rejected.append({"path": path, "reason": reason[0], "detail": reason[1]})
            continue
        seen.add(key)
        if path not in images:
            images[path] = _read_image(fs, base, path)
        digest, size = images[path]
        if not isinstance(size, tuple):  # (reason, detail) of an image that could not be read
            rejected.append({"path": path, "reason": digest, "detail": size})
            continue
        owner_path, owner_label = content_owner.setdefault(digest, (path, label))
        if not captions_only and owner_label != label:
            rejected.append({"path": path, "reason": "duplicate_content_other_label",
                             "detail": f"same bytes as an image labelled {owner_label!r}"})
            continue
        stored_path = owner_path if captions_only else path
        uri = f"{base}/{stored_path}" if _is_local(fs) else f"{_protocol(fs)}://{base}/{stored_path}"
        accepted.append({
            "image_id": digest[:20], "uri": uri, "path": stored_path, "label": label,
            "caption": _clean(row.get("caption")), "category": _clean(row.get("category")) or label,
            "source": _clean(row.get("source")) or "default", "sha256": digest,
            "width": size[0], "height": size[1],
        })
    if not accepted:
        reasons = pl.DataFrame(rejected)["reason"].value_counts().rows() if rejected else []
        raise ManifestError(f"no usable image in {root!r} ({rows.height} rows; rejections: {reasons})")
    frame = pl.DataFrame(accepted).unique(subset=["image_id", "label"], keep="first", maintain_order=True)
    return IngestResult(frame, pl.DataFrame(rejected, schema={"path": pl.String, "reason": pl.String, "detail": pl.String}))


def _read_image(fs: fsspec.AbstractFileSystem, base: str, path: str) -> tuple[str, tuple[int, int]] | tuple[str, str]:
    """``(sha256 hex, (width, height))`` of a decodable image, else ``(reason, detail)`` of its rejection."""
    try:
        data = fs.cat_file(f"{base}/{path}")
        image = decode_image(data, name=path)
    except ImageRejected as exc:
        return exc.reason, str(exc)
    except OSError as exc:  # permissions, a file removed meanwhile: this row only, not the run
        return "unreadable", f"{type(exc).__name__}: {exc}"
    return hashlib.sha256(data).hexdigest(), image.size


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


def source_fingerprint(rows: pl.DataFrame, root: str) -> str:
    """Content fingerprint of a source: hash over (path, label, caption, category, file sha256).

    Changes when an image is added, removed, relabelled or its bytes change; unreadable
    files hash as empty so the fingerprint still moves when they are fixed. Paths that
    escape the root (``..``, absolute, symlinks out) or are not regular files are never
    opened: they hash as empty too (:func:`ingest` rejects them).
    """
    fs, base = fsspec.core.url_to_fs(source_root(root))
    digest = hashlib.sha256()
    for row in rows.sort("path").iter_rows(named=True):
        path = str(row["path"] or "")
        try:
            content = hashlib.sha256(fs.cat_file(f"{base}/{path}")).hexdigest() if _safe_to_read(fs, base, path) else ""
        except (OSError, ValueError):
            content = ""
        digest.update(repr((row["path"], row["label"], row["caption"], row["category"], content)).encode())
    return digest.hexdigest()[:24]


def class_stats(manifest: pl.DataFrame) -> dict[str, int]:
    """Counts shown to users: images, classes, singleton classes (unusable as retrieval queries)."""
    sizes = manifest.group_by("label").len()
    return {
        "images": manifest.height,
        "classes": sizes.height,
        "singleton_classes": int((sizes["len"] == 1).sum()),
        "sources": manifest["source"].n_unique(),
    }


def _row_problem(fs: fsspec.AbstractFileSystem, base: str, path: str, label: object, repeated: bool,
                 captions_only: bool) -> tuple[str, str] | None:
    """First reason a row is unusable before its bytes are read, or ``None`` (``repeated``: its key was seen)."""
    if not path:
        return "missing_path", "empty path"
    if "\x00" in path:  # os.path raises ValueError on it; no real file has one
        return "invalid_path", f"{path!r} contains a NUL byte"
    if _escapes_lexically(path):
        return "path_escapes_root", f"{path!r} must be relative to the source root without '..'"
    if label is None or not str(label).strip():
        return ("empty_caption", "caption is empty") if captions_only else ("empty_label", "label is empty")
    if repeated and captions_only:
        return "duplicate_pair", f"{path!r} with caption {str(label).strip()!r} listed more than once"
    if repeated:
        return "duplicate_path", f"{path!r} listed more than once"
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not_an_image", f"extension not one of {IMAGE_EXTENSIONS}"
    full = f"{base}/{path}"
    if _is_local(fs):
        real_root = os.path.realpath(base)
        if not os.path.realpath(full).startswith(real_root + os.sep):
            return "path_escapes_root", f"{path!r} resolves outside the source root (symlink?)"
    if not fs.exists(full):
        return "missing_file", f"{full} does not exist"
    if _is_local(fs) and not os.path.isfile(full):  # a FIFO or device would block or never end
        return "not_a_regular_file", f"{full} is not a regular file"
    return None


def _escapes_lexically(path: str) -> bool:
    """Absolute, ``..``-climbing or URL-like (``s3:``, ``C:``) paths, before any filesystem access."""
    normal = posixpath.normpath(path.replace("\\", "/"))
    return posixpath.isabs(normal) or normal == ".." or normal.startswith("../") or ":" in path.split("/")[0]


def _safe_to_read(fs: fsspec.AbstractFileSystem, base: str, path: str) -> bool:
    """Whether ``path`` is relative, stays inside ``base`` (symlinks resolved) and is a regular file."""
    if not path or "\x00" in path or _escapes_lexically(path):
        return False
    if not _is_local(fs):
        return True
    full = f"{base}/{path}"
    return os.path.realpath(full).startswith(os.path.realpath(base) + os.sep) and os.path.isfile(full)


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


def _clean(value: object) -> str | None:
    text = None if value is None else str(value).strip()
    return text or None


def source_root(location: str) -> str:
    """The folder image paths are relative to: ``location`` itself, or a manifest file's folder."""
    return _split_location(location)[0]


def _split_location(location: str) -> tuple[str, str | None]:
    location = location.rstrip("/")
    if location.lower().endswith((".csv", ".parquet")):
        root, _, name = location.rpartition("/")
        return root, name
    return location, None


def _read_manifest_file(fs: fsspec.AbstractFileSystem, base: str, location: str, captions_only: bool) -> pl.DataFrame:
    name = location.rsplit("/", 1)[-1]
    with fs.open(f"{base}/{name}", "rb") as handle:
        frame = pl.read_parquet(handle) if name.endswith(".parquet") else pl.read_csv(handle, infer_schema_length=0)
    required = ("path", "caption") if captions_only else REQUIRED_COLUMNS
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ManifestError(f"{location} lacks column(s) {missing}; required {list(required)}, optional {list(OPTIONAL_COLUMNS)}")
    if captions_only:
        frame = frame.with_columns(pl.col("caption").alias("label"))
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias(column))
    return frame.select([pl.col(c).cast(pl.String) for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)])


def _scan_class_folders(fs: fsspec.AbstractFileSystem, base: str) -> pl.DataFrame:
    rows = []
    for full in sorted(fs.find(base)):
        relative = full[len(base):].lstrip("/")
        parts = relative.split("/")
        if len(parts) != 2 or not parts[1].lower().endswith(IMAGE_EXTENSIONS):
            continue
        rows.append({"path": relative, "label": parts[0].replace("_", " "), "caption": None, "category": None, "source": None})
    if not rows:
        raise ManifestError(f"no images found in class folders under {base!r} (expected root/<label>/<image>)")
    return pl.DataFrame(rows, schema={c: pl.String for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)})
