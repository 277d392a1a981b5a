"""Decode untrusted image bytes into RGB, or reject them with a reason.

Accepted: any format Pillow opens (PNG, JPEG, GIF (first frame), WebP, BMP, TIFF…) and SVG
(rendered with resvg). Normalisation: EXIF orientation applied, palette/alpha/CMYK/16-bit/
grayscale converted, transparency composited on white. Rejected (``ImageRejected`` with a
short reason): empty or truncated files, non-images, decompression bombs, tiny images.

Image locations (``uri``) are local paths, fsspec URLs, or members of an uncompressed tar shard
(:func:`clipopt_core.data.tar_shards.member_uri`), read with one range read of the shard
(:func:`read_uri_bytes`): images in webdataset shards are used in place, never extracted
(docs/scaling.md, "Ingest and sources").
"""
from __future__ import annotations

import io
import re
import warnings

import fsspec
from PIL import Image, ImageOps

from clipopt_core.data.tar_shards import is_member_uri, read_member

MAX_PIXELS = 64_000_000  # ~8k x 8k; Pillow's own bomb guard is 89 M
MIN_SIDE = 8
SVG_RENDER_SIDE = 256
SVG_EXTENSIONS = (".svg",)


class ImageRejected(ValueError):
    """The bytes are not a usable image; ``reason`` is a short machine-friendly phrase."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def read_uri_bytes(uri: str) -> bytes:
    """The bytes at ``uri``: a whole file (local path or fsspec URL) or one tar member (one range read)."""
    if is_member_uri(uri):
        return read_member(uri)
    with fsspec.open(uri, "rb") as handle:
        return handle.read()


def decode_image(data: bytes, *, name: str = "", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (file bytes) to an RGB image composited on white.

    Args:
        data: raw file bytes.
        name: file name, used to recognise SVG and in messages.
        max_pixels: reject images with more pixels than this (decompression bombs).
    Raises:
        ImageRejected: with ``reason`` one of ``empty``, ``svg_render_failed``, ``not_an_image``,
        ``too_large``, ``truncated``, ``too_small``.
    """
    if not data:
        raise ImageRejected("empty", "zero-byte file")
    if name.lower().endswith(SVG_EXTENSIONS) or data.lstrip()[:5] in (b"<svg ", b"<?xml"):
        return _render_svg(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("too_large", str(exc)) from exc
        except Exception as exc:  # Pillow raises UnidentifiedImageError and assorted errors
            message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # run-independent detail
            raise ImageRejected("not_an_image", f"{type(exc).__name__}: {message}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise ImageRejected("truncated", f"{type(exc).__name__}: {exc}") from exc
    if min(image.size) < MIN_SIDE:
        raise ImageRejected("too_small", f"{image.size[0]}x{image.size[1]} is below {MIN_SIDE} px")
    return to_rgb_on_white(image)


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("LA", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _render_svg(data: bytes) -> Image.Image:
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=SVG_RENDER_SIDE, height=SVG_RENDER_SIDE)
        image = Image.open(io.BytesIO(bytes(png)))
        image.load()
    except Exception as exc:
        raise ImageRejected("svg_render_failed", f"{type(exc).__name__}: {exc}") from exc
    return to_rgb_on_white(image)
