"""Framework for the benchmark loaders: one root (local path or ``s3://…``) opened through fsspec.

Every loader goes through :class:`BenchmarkRoot`, so a missing root, a missing file or a malformed row
raises :class:`~clipopt_core.suite.types.BenchmarkLayoutError` naming the exact path (and line) together
with what the official layout expects, instead of a bare ``FileNotFoundError`` deep in a protocol.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
from PIL import Image

from clipopt_core.suite.types import BenchmarkLayoutError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class BenchmarkRoot:
    """A benchmark's root folder; paths below it are ``/``-joined strings relative to it.

    Args:
        root: local folder or fsspec URL (``s3://bucket/prefix``; credentials and endpoint come from
            the environment, as for :func:`clipopt_core.data.datasets.load_image`).
        benchmark: name used in messages ("CUB-200-2011").
        fix: how to obtain the official layout, appended to every layout error
            ("download X from Y and unpack so that … exists").
    """

    def __init__(self, root: str, benchmark: str, fix: str) -> None:
        self.url = str(root).rstrip("/")
        self.benchmark = benchmark
        self.fix = fix
        try:
            self.fs, path = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as error:
            raise BenchmarkLayoutError(f"{benchmark}: cannot open root {self.url!r} ({error})") from error
        self.path = path.rstrip("/")
        self.protocol = self.url.split("://", 1)[0] + "://" if "://" in self.url else ""
        if not self.fs.isdir(self.path):
            raise self.error(f"root {self.uri('')} does not exist or is not a folder")

    def error(self, problem: str) -> BenchmarkLayoutError:
        """A layout error: ``"<benchmark>: <problem>; <fix>"``."""
        return BenchmarkLayoutError(f"{self.benchmark}: {problem}; {self.fix}")

    def full(self, rel: str) -> str:
        """Filesystem path (no protocol) of ``rel``."""
        return f"{self.path}/{rel}" if rel else self.path

    def uri(self, rel: str) -> str:
        """URI of ``rel`` that :func:`~clipopt_core.data.datasets.load_image` opens (the root's protocol kept)."""
        return f"{self.protocol}{self.full(rel)}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.full(rel)))

    def isdir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self.full(rel)))

    def require(self, rel: str, what: str = "file") -> str:
        """``rel`` if it exists, else a layout error naming its full URI."""
        exists = self.isdir(rel) if what == "folder" else self.fs.isfile(self.full(rel))
        if not exists:
            raise self.error(f"missing {what} {self.uri(rel)}")
        return rel

    def read_bytes(self, rel: str) -> bytes:
        self.require(rel)
        return self.fs.cat_file(self.full(rel))

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.error(f"{self.uri(rel)} is not UTF-8 text ({error})") from error

    def rows(self, rel: str, columns: int, *, split_once: bool = False) -> Iterator[tuple[int, list[str]]]:
        """Non-empty lines of a whitespace-separated text file as ``(line number, fields)``.

        ``split_once``: split only at the first space (``"<id> <name with spaces>"``), giving 2 fields.
        A line with another field count raises a layout error naming ``file:line``.
        """
        for number, line in enumerate(self.read_text(rel).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.strip().split(" ", 1) if split_once else line.split()
            if len(fields) != columns:
                raise self.error(f"{self.uri(rel)}:{number}: expected {columns} fields, got {line!r}")
            yield number, fields

    def int_field(self, rel: str, number: int, value: str) -> int:
        """``value`` as int, else a layout error naming ``file:line``."""
        try:
            return int(value)
        except ValueError:
            raise self.error(f"{self.uri(rel)}:{number}: {value!r} is not an integer") from None

    def subfolders(self, rel: str) -> list[str]:
        """Names of the folders directly inside ``rel``, sorted (hidden ones skipped)."""
        self.require(rel, "folder")
        entries = self.fs.ls(self.full(rel), detail=True)
        names = (entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory")
        return sorted(name for name in names if not name.startswith("."))

    def images_by_folder(self, rel: str) -> dict[str, list[str]]:
        """Image files below ``rel``, grouped by the folder holding them (relative to ``rel``; ``""`` for ``rel``).

        Returns folder → sorted image paths relative to the root. Files whose suffix is not in
        ``IMAGE_SUFFIXES`` (annotation ``.txt`` files, READMEs) and hidden files are skipped.
        """
        self.require(rel, "folder")
        base = self.full(rel) + "/"
        grouped: dict[str, list[str]] = {}
        for found in self.fs.find(self.full(rel)):
            inside = found[len(base):]
            folder, _, name = inside.rpartition("/")
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            grouped.setdefault(folder, []).append(f"{rel}/{inside}" if rel else inside)
        return {folder: sorted(paths) for folder, paths in sorted(grouped.items())}

    def image_sizes(self, rels: Sequence[str], workers: int = 16) -> np.ndarray:
        """[N, 2] int64 ``(width, height)`` in pixels, read from the image headers (no decoding)."""
        def size(rel: str) -> tuple[int, int]:
            try:
                with self.fs.open(self.full(rel), "rb") as handle, Image.open(handle) as image:
                    return image.size
            except (OSError, Image.UnidentifiedImageError) as error:
                raise self.error(f"cannot read image {self.uri(rel)} ({error})") from error

        with ThreadPoolExecutor(max_workers=workers) as pool:
            sizes = list(pool.map(size, rels))
        return np.asarray(sizes, dtype=np.int64).reshape(len(rels), 2)


def trimmed_boxes(sizes: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """[N, 4] float ``(x0, y0, x1, y1)`` boxes that cut the given pixel margins off images of [N, 2] ``sizes``."""
    width, height = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    return np.stack([np.full_like(width, left), np.full_like(height, top), width - right, height - bottom], axis=1)


def clean_class_name(raw: str) -> str:
    """Folder-style class name to a prompt-ready one.

    ``"001.Black_footed_Albatross"`` → ``"Black footed Albatross"``.
    """
    return re.sub(r"^\d+\.", "", raw).replace("_", " ").strip()
