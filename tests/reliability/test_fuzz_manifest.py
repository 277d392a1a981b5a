"""Fuzzing ``manifest.ingest``: hostile rows and random bytes never raise anything but ManifestError.

Each example writes a fresh source folder: files with random bytes, valid image headers followed
by garbage, a real tiny PNG, a directory and a symlink out; then a manifest whose paths mix
those names with '..', absolute paths, unicode, empty strings and NULs, and labels that are
empty, blank or unicode. Invariants: only ManifestError escapes; every accepted row is a safe
path inside the root with a non-blank label; accepted + rejected never exceeds the rows.
"""
from __future__ import annotations

import io
import os
import posixpath
import tempfile
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipopt_core.data.manifest import ManifestError, ingest

COLUMNS = ("path", "label", "caption", "category", "source")
HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
           b"BM", b"II*\x00", b"<svg ", b"<?xml version='1.0'?><svg"]
NAMES = ["a.png", "b.jpg", "c.gif", "d.webp", "e.bmp", "f.tif", "g.svg", "h.jpeg", "sub/i.png", "ünï cødé.png",
         "space name.PNG"]


def _real_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


REAL_PNG = _real_png()
file_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda header, tail: header + tail, st.sampled_from(HEADERS), st.binary(max_size=300)),
    st.builds(lambda cut: REAL_PNG[:cut], st.integers(0, len(REAL_PNG))),
    st.just(REAL_PNG),
)
hostile_paths = st.one_of(
    st.sampled_from(NAMES + ["outside_link.png", "a_dir.png", "../escape.png", "/etc/hostname", "sub/../a.png",
                             "./a.png", "a.png/", "", " ", "s3://bucket/x.png", "C:\\x.png", "..\\x.png", "a\x00.png"]),
    st.text(max_size=30),
    st.builds(lambda t: t + ".png", st.text(max_size=20)),
)
labels = st.one_of(st.none(), st.sampled_from(["", "   ", "cat", "dog", "😺 chat", "\x00", "a\nb"]), st.text(max_size=12))


PINNED_PATHS = ["../escape.png", "/etc/hostname", "outside_link.png", "a_dir.png", "sub/../a.png", "a\x00.png", "",
                "s3://bucket/x.png", "C:\\x.png", "..\\x.png", "ünï cødé.png", "a.png", "a.png"]


# the hostile cases found so far (NUL in a path crashed ingest with ValueError) always run first
@example(files=[(name, header + b"garbage") for name, header in zip(NAMES, HEADERS)] + [("ünï cødé.png", REAL_PNG)],
         rows=[(path, label, None) for path, label in zip(PINNED_PATHS, ["cat", "dog", None, "x", "cat", "cat", "y",
                                                                           "z", "w", "v", "😺", "", "cat"])])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=st.lists(st.tuples(st.sampled_from(NAMES), file_bytes), max_size=8),
       rows=st.lists(st.tuples(hostile_paths, labels, st.one_of(st.none(), st.text(max_size=10))), max_size=12))
def test_ingest_never_raises_anything_but_manifest_error(files: list[tuple[str, bytes]], rows: list[tuple]):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "sub").mkdir(parents=True)
        (root / "a_dir.png").mkdir()
        (Path(tmp) / "escape.png").write_bytes(REAL_PNG)
        os.symlink(Path(tmp) / "escape.png", root / "outside_link.png")
        for name, data in files:
            (root / name).write_bytes(data)
        frame = pl.DataFrame([{"path": p, "label": l, "caption": c, "category": None, "source": None} for p, l, c in rows],
                             schema={c: pl.String for c in COLUMNS})
        try:
            result = ingest(str(root), frame)
        except ManifestError as exc:
            assert "no usable image" in str(exc)
            return
        assert result.accepted.height + result.rejected.height <= frame.height
        real_root = os.path.realpath(root)
        for row in result.accepted.iter_rows(named=True):
            normal = posixpath.normpath(row["path"])
            assert row["label"].strip() and not normal.startswith("..") and not normal.startswith("/")
            assert os.path.realpath(row["uri"]).startswith(real_root + os.sep)
        assert set(result.rejected.columns) == {"path", "reason", "detail"}
