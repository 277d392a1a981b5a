"""Bad and odd images at the asset level: raw_images + image_manifest on a mixed source.

Decoding of each kind is unit-tested in tests/unit/test_data.py; here the question is what a
*run* does with them: it succeeds, odd-but-valid images are accepted (normalised), broken
ones land in ``data/rejected.parquet`` with their reason, and the counts are in the metadata.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from clipopt_core.runtime.storage import ArtifactStore
from tests.conftest import write_shapes_source
from tests.reliability.conftest import DATA_ASSETS, failure_text, materialize, metadata

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10" viewBox="0 0 10 10">'
       b'<rect x="0" y="0" width="5" height="10" fill="#ff0000"/></svg>')


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(width: int = 48, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.RandomState(1).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def broken_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the rejection reason a run must record)."""
    jpeg = _encode(_noise(), "JPEG")
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) \
        + _png_chunk(b"IEND", b"")
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "zero.png": (b"", "empty"),
        "text.png": (b"this is a text file with an image name\n" * 4, "not_an_image"),
        "bomb.png": (bomb, "too_large"),
    }


def odd_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (bytes, the (width, height) the accepted row must record after normalisation)."""
    palette = Image.new("P", (24, 24), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 12, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return {
        "cmyk.jpg": (_encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"), (30, 20)),
        "sixteen_bit.png": (_encode(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG"), (30, 20)),
        "palette_transparent.png": (_encode(palette, "PNG", transparency=0), (24, 24)),
        "grayscale.png": (_encode(Image.new("L", (30, 20), 128), "PNG"), (30, 20)),
        "exif_rotated.jpg": (_encode(_noise(40, 20), "JPEG", exif=exif.tobytes()), (20, 40)),
        "animated.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50), (20, 20)),
        "vector.svg": (SVG, (256, 256)),
    }


def mixed_source(root: Path, *, with_good: bool = True) -> Path:
    """Shapes (16 classes x 2) plus every odd and broken file, listed in one manifest."""
    rows = []
    if with_good:
        write_shapes_source(root, per_class=2)
        rows = pl.read_csv(root / "manifest.csv").to_dicts()
    root.mkdir(parents=True, exist_ok=True)
    for folder, files in (("odd", odd_images()), ("broken", broken_images())):
        (root / folder).mkdir(exist_ok=True)
        for name, (data, _) in files.items():
            (root / folder / name).write_bytes(data)
            rows.append({"path": f"{folder}/{name}", "label": f"{folder} {name.split('.')[0]}", "caption": None,
                         "category": None, "source": folder})
    pl.DataFrame(rows, schema={c: pl.String for c in ("path", "label", "caption", "category", "source")}) \
        .write_csv(root / "manifest.csv")
    return root


def test_mixed_source_run_succeeds_and_sorts_images(tmp_path: Path):
    source = mixed_source(tmp_path / "src")
    result = materialize(DATA_ASSETS, tmp_path, source)
    assert result.success, failure_text(result)

    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    rejected = store.read_parquet("data/rejected.parquet")
    accepted = store.read_parquet("data/manifest.parquet")
    expected_reasons = {f"broken/{name}": reason for name, (_, reason) in broken_images().items()}
    assert dict(zip(rejected["path"], rejected["reason"])) == expected_reasons
    assert all(rejected["detail"].str.len_chars() > 0)

    sizes = {row["path"]: (row["width"], row["height"]) for row in accepted.iter_rows(named=True)}
    for name, (_, size) in odd_images().items():
        assert sizes.get(f"odd/{name}") == size, name  # accepted, normalised (EXIF rotation applied)
    assert accepted.height == 32 + len(odd_images())
    assert not set(accepted["path"]) & set(expected_reasons)

    raw = metadata(result, "raw_images")
    meta = metadata(result, "image_manifest")
    assert raw["rows"] == 32 + len(odd_images()) + len(broken_images())
    assert meta["rejected"] == len(broken_images()) and meta["images"] == accepted.height
    assert meta["classes"] == 16 + len(odd_images()) and meta["singleton_classes"] == len(odd_images())
    for reason in expected_reasons.values():
        assert f"| {reason} | 1 |" in meta["rejected_by_reason"]
    assert store.list_temp_objects() == []


def test_source_with_only_bad_images_fails_clearly(tmp_path: Path):
    root = tmp_path / "src"
    root.mkdir()
    rows = []
    for name, (data, _) in broken_images().items():
        (root / name).write_bytes(data)
        rows.append({"path": name, "label": "broken"})
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    result = materialize(DATA_ASSETS, tmp_path, root)
    assert not result.success
    [failed] = [e.step_key for e in result.get_step_failure_events()]
    assert failed == "image_manifest"
    text = failure_text(result)
    assert "ManifestError" in text and "no usable image" in text and "4 rows" in text
    for reason in ("truncated", "empty", "not_an_image", "too_large"):
        assert f"'{reason}'" in text, reason
    assert not ArtifactStore(f"file://{tmp_path / 'artifacts'}").exists("data/manifest.parquet")
