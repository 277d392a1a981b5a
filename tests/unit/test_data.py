"""Unit tests for image decoding (clipopt_core.data.images), manifests (clipopt_core.data.manifest) and
datasets / batch order (clipopt_core.data.datasets). All images are made in the tests."""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from clipopt_core.data.datasets import (
    EpochBatches,
    ImageDataset,
    encode_labels,
    eval_geometry,
    eval_transform,
    load_image,
    normalize_batch,
    sample_seed,
    train_transform,
)
from clipopt_core.data.images import ImageRejected, decode_image
from clipopt_core.data.manifest import ManifestError, class_stats, ingest, scan_source, split_by_class

from tests.conftest import write_shapes_source

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int = 64, height: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (height, width, 3), dtype=np.uint8))


def rejected_reason(data: bytes, name: str = "") -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, name=name)
    return info.value.reason


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


# ------------------------------------------------------------------ decode_image

def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 1), (255, 0, 0, 255))  # opaque red
    image.putpixel((2, 2), (255, 0, 0, 128))  # half-transparent red
    out = decode_image(encode(image))
    assert out.mode == "RGB" and out.size == (16, 16)
    assert out.getpixel((0, 0)) == WHITE  # transparent black must not come out black
    assert out.getpixel((1, 1)) == RED
    r, g, b = out.getpixel((2, 2))  # 128/255 red over white: G = B = 255 * 127 / 255 = 127
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_grayscale_alpha_is_composited_on_white():
    image = Image.new("LA", (16, 16), (0, 0))  # transparent black
    image.putpixel((3, 3), (40, 255))
    out = decode_image(encode(image))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((3, 3)) == (40, 40, 40)


def test_palette_with_transparency():
    image = Image.new("P", (16, 16), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0 = red, 1 = blue
    for x in range(8):
        for y in range(16):
            image.putpixel((x, y), 0)
    out = decode_image(encode(image, transparency=1))  # blue is the transparent index
    assert out.mode == "RGB"
    assert out.getpixel((2, 5)) == RED
    assert out.getpixel((12, 5)) == WHITE


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits():
    values = np.array([[0, 32768, 65535, 256] * 4] * 16, dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit PNG
    out = decode_image(data)
    # v / 256, truncated: 0 -> 0, 32768 -> 128, 65535 -> 255, 256 -> 1 (not clipped to 255 everywhere)
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)]


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # C=0 M=Y=full K=0: red
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(out.getpixel((8, 8)), RED))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)  # width and height swapped
    # turning clockwise brings the stored left edge to the top
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert decode_image(data).getpixel((8, 8)) == RED


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected(fmt: str):
    full = encode(noise(), fmt)
    assert decode_image(full).size == (64, 64)
    assert rejected_reason(full[: len(full) // 2]) == "truncated"  # header fine, pixel data cut
    assert rejected_reason(full[:10]) in ("truncated", "not_an_image")


def test_empty_and_non_image_bytes():
    assert rejected_reason(b"", name="a.png") == "empty"
    assert rejected_reason(b"just some text, not pixels\n" * 5, name="notes.png") == "not_an_image"


def test_decompression_bomb_header_is_rejected_without_decoding():
    # a 57-byte PNG whose header claims 20000 x 20000 pixels (400 M)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    assert len(data) < 100
    assert rejected_reason(data) == "too_large"
    # below Pillow's own guard but above clipopt's limit
    ihdr = struct.pack(">IIBBBBB", 9000, 8000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    assert rejected_reason(data) == "too_large"
    with pytest.raises(ImageRejected, match="too_large"):
        decode_image(encode(Image.new("RGB", (100, 100))), max_pixels=9_999)


def test_tiny_image_is_rejected():
    assert rejected_reason(encode(Image.new("RGB", (4, 30)))) == "too_small"


def test_svg_is_rendered():
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10" viewBox="0 0 10 10">'
           b'<rect x="0" y="0" width="5" height="10" fill="#ff0000"/></svg>')
    out = decode_image(svg, name="logo.svg")
    assert out.mode == "RGB" and out.size == (256, 256)
    assert out.getpixel((10, 128)) == RED  # left half drawn red
    assert out.getpixel((250, 128)) == WHITE  # undrawn (transparent) area on white
    assert decode_image(svg).size == (256, 256)  # recognised by content too
    assert rejected_reason(b"<svg broken", name="bad.svg") == "svg_render_failed"


# ------------------------------------------------------------------ scan_source

def test_scan_source_manifest_layout(shapes_source: Path):
    rows = scan_source(str(shapes_source))
    assert rows.columns == ["path", "label", "caption", "category", "source"]
    assert rows.height == 48 and rows["label"].n_unique() == 16
    first = rows.row(0, named=True)
    assert first == {"path": "red_circle/0.png", "label": "red circle", "caption": "a red circle",
                     "category": "circle", "source": "shapes-b"}


def test_scan_source_class_folder_layout(tmp_path: Path):
    root = write_shapes_source(tmp_path / "folders", per_class=2, layout="folders")
    (root / "notes.txt").write_text("ignored")
    (root / "red_circle" / "readme.md").write_text("ignored")
    for layout in ("auto", "folders"):
        rows = scan_source(str(root), layout)
        assert rows.height == 32
        assert set(rows["label"]) == {f"{c} {s}" for c in ("red", "green", "blue", "orange")
                                      for s in ("circle", "square", "triangle", "cross")}  # '_' -> ' '
        assert rows.filter(pl.col("path") == "blue_cross/1.png")["label"].to_list() == ["blue cross"]
        assert rows["caption"].null_count() == 32


def test_scan_source_errors(tmp_path: Path):
    with pytest.raises(ManifestError, match="not a folder"):
        scan_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        scan_source(str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="unknown layout"):
        scan_source(str(tmp_path / "empty"), "zip")
    bad = tmp_path / "bad"
    bad.mkdir()
    pl.DataFrame({"path": ["a.png"], "caption": ["x"]}).write_csv(bad / "manifest.csv")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['label'\]"):
        scan_source(str(bad))
    assert scan_source(str(bad), captions_only=True)["label"].to_list() == ["x"]  # caption doubles as label


# ------------------------------------------------------------------ ingest

@pytest.fixture()
def hostile_source(tmp_path: Path) -> Path:
    root = write_shapes_source(tmp_path / "src", per_class=1)  # 16 good images, one per class
    good = pl.read_csv(root / "manifest.csv")
    outside = tmp_path / "outside.png"
    outside.write_bytes((root / "red_circle/0.png").read_bytes())
    shutil.copy(outside, tmp_path / "x.png")  # so '../x.png' exists: refused for escaping, not for missing
    os.symlink(outside, root / "link.png")
    shutil.copy(root / "green_square/0.png", root / "copy_of_green_square.png")
    shutil.copy(root / "blue_cross/0.png", root / "same_label_copy.png")
    bad = [
        ("../x.png", "red circle"),
        ("/etc/passwd", "red circle"),
        ("link.png", "red circle"),
        ("red_circle/0.png", "red circle"),  # listed twice
        ("green_circle/0.png", None),
        ("blue_circle/0.png", "   "),
        ("nope/missing.png", "red circle"),
        ("copy_of_green_square.png", "something else"),
        ("same_label_copy.png", "blue cross"),  # same bytes, same label: kept once, not an error
        ("manifest.csv", "red circle"),
    ]
    rows = good.to_dicts() + [{"path": p, "label": l, "caption": None, "category": None, "source": None} for p, l in bad]
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


def test_ingest_rejects_each_bad_row_with_its_reason(hostile_source: Path):
    result = ingest(str(hostile_source), scan_source(str(hostile_source)))
    reasons = dict(zip(result.rejected["path"], result.rejected["reason"]))
    assert reasons == {
        "../x.png": "path_escapes_root",
        "/etc/passwd": "path_escapes_root",
        "link.png": "path_escapes_root",
        "red_circle/0.png": "duplicate_path",  # the second listing only
        "green_circle/0.png": "empty_label",
        "blue_circle/0.png": "empty_label",
        "nope/missing.png": "missing_file",
        "copy_of_green_square.png": "duplicate_content_other_label",
        "manifest.csv": "not_an_image",
    }
    accepted = result.accepted
    # the 16 good rows; the second listings of good paths are the rejected ones
    assert accepted.height == 16
    assert "red_circle/0.png" in accepted["path"].to_list()
    assert "same_label_copy.png" not in accepted["path"].to_list()  # duplicate bytes + label collapse into one
    labels = dict(zip(accepted["path"], accepted["label"]))
    assert labels["red_circle/0.png"] == "red circle" and labels["orange_triangle/0.png"] == "orange triangle"
    assert all(labels[p] == p.split("/")[0].replace("_", " ") for p in labels)
    row = accepted.filter(pl.col("path") == "green_square/0.png").row(0, named=True)
    assert row["caption"] == "a green square" and row["category"] == "square"
    assert (row["width"], row["height"]) == (40, 40)
    assert row["image_id"] == row["sha256"][:20] and len(row["sha256"]) == 64
    assert Path(row["uri"]).is_file() and load_image(row["uri"]).size == (40, 40)
    assert class_stats(accepted) == {"images": 16, "classes": 16, "singleton_classes": 16, "sources": 1}


def test_ingest_with_nothing_usable_raises(tmp_path: Path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.png").write_text("not really a png")
    rows = pl.DataFrame({"path": ["a.png", "../b.png", "c.png"], "label": ["x", "y", "z"],
                         "caption": [None] * 3, "category": [None] * 3, "source": [None] * 3},
                        schema={c: pl.String for c in ("path", "label", "caption", "category", "source")})
    with pytest.raises(ManifestError, match="no usable image"):
        ingest(str(root), rows)


def test_ingest_reports_progress(shapes_source: Path):
    seen: list[tuple[int, int]] = []
    ingest(str(shapes_source), scan_source(str(shapes_source)).head(3), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


# ------------------------------------------------------------------ split_by_class

def _labels(count: int, per_class: int = 2) -> pl.DataFrame:
    return pl.DataFrame({"label": [f"class {n}" for n in range(count) for _ in range(per_class)]})


def test_split_is_class_disjoint_and_deterministic():
    frame = _labels(400)
    split = split_by_class(frame, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert split.height == frame.height and set(split["split"]) == {"train", "val", "test"}
    assert split.group_by("label").agg(pl.col("split").n_unique())["split"].max() == 1  # one split per class
    assert split.equals(split_by_class(frame, val_fraction=0.2, test_fraction=0.1, seed=3))
    shares = split.group_by("split").len().with_columns(pl.col("len") / split.height)
    share = dict(zip(shares["split"], shares["len"]))
    assert share["test"] == pytest.approx(0.1, abs=0.05) and share["val"] == pytest.approx(0.2, abs=0.06)
    assert not split.equals(split_by_class(frame, val_fraction=0.2, test_fraction=0.1, seed=4))  # seed matters


def test_split_is_stable_when_classes_are_added():
    before = split_by_class(_labels(50), val_fraction=0.2, test_fraction=0.2)
    grown = pl.concat([_labels(50), pl.DataFrame({"label": ["brand new class"] * 3}), _labels(80)[100:]])
    after = split_by_class(grown, val_fraction=0.2, test_fraction=0.2)
    old = dict(zip(before["label"], before["split"]))
    new = dict(zip(after["label"], after["split"]))
    assert all(new[label] == split for label, split in old.items())


def test_split_extremes_and_validation():
    frame = _labels(100)
    assert set(split_by_class(frame, val_fraction=0.0, test_fraction=0.0)["split"]) == {"train"}
    for val, test in [(0.6, 0.5), (-0.1, 0.1), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]:
        with pytest.raises(ValueError, match="fraction"):
            split_by_class(frame, val_fraction=val, test_fraction=test)


# ------------------------------------------------------------------ batches and datasets

def test_epoch_batches_cover_the_epoch_once():
    batches = list(EpochBatches(23, 5, seed=1, epoch=0))
    assert len(batches) == len(EpochBatches(23, 5, seed=1)) == 4  # 23 // 5, incomplete batch dropped
    indices = [index for batch in batches for index, _ in batch]
    assert len(indices) == 20 and len(set(indices)) == 20 and set(indices) <= set(range(23))
    assert all(seed == sample_seed(1, 0, index) for batch in batches for index, seed in batch)


def test_epoch_batches_resume_yields_the_tail():
    full = list(EpochBatches(30, 4, seed=5, epoch=2))
    for k in range(len(full) + 1):
        sampler = EpochBatches(30, 4, seed=5, epoch=2, start_step=k)
        assert list(sampler) == full[k:] and len(sampler) == len(full) - k


def test_epoch_batches_seeded_by_seed_and_epoch():
    assert list(EpochBatches(30, 4, seed=5, epoch=1)) == list(EpochBatches(30, 4, seed=5, epoch=1))
    order = lambda seed, epoch: [i for b in EpochBatches(30, 4, seed=seed, epoch=epoch) for i, _ in b]
    assert order(5, 0) != order(5, 1)  # each epoch is reshuffled
    assert order(5, 0) != order(6, 0)
    assert sample_seed(5, 0, 3) != sample_seed(5, 1, 3)  # augmentation differs across epochs too
    assert 0 <= sample_seed(5, 0, 3) < 2**63


def test_epoch_batches_fewer_items_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatches(3, 8, seed=0)


def test_encode_labels():
    assert encode_labels(["b", "a", "b", "c"]) == ([1, 0, 1, 2], ["a", "b", "c"])


@pytest.fixture(scope="module")
def shape_uris(shapes_source: Path) -> list[str]:
    return [str(shapes_source / p) for p in scan_source(str(shapes_source))["path"].to_list()[:4]]


def test_seeded_augmentation_is_reproducible(shape_uris: list[str]):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    dataset = ImageDataset(shape_uris, [0, 1, 2, 3], train_transform(32, mean, std))
    state = torch.get_rng_state()
    image, label, index = dataset[(2, 12345)]
    assert torch.equal(torch.get_rng_state(), state)  # seeded items leave the global RNG alone
    assert image.shape == (3, 32, 32) and int(label) == 2 and index == 2
    torch.manual_seed(999)  # whatever the global RNG holds
    other = ImageDataset(shape_uris, [0, 1, 2, 3], train_transform(32, mean, std), cache_decoded=False)
    assert torch.equal(other[(2, 12345)][0], image)
    assert torch.equal(dataset[(2, 12345)][0], image)
    assert any(not torch.equal(dataset[(2, seed)][0], image) for seed in (1, 2, 3))


def test_eval_transform_is_deterministic(shape_uris: list[str]):
    dataset = ImageDataset(shape_uris, [0] * 4, eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    first = dataset[1][0]
    assert first.shape == (3, 32, 32)
    assert torch.equal(dataset[1][0], first)
    # corner pixel is background: the drawing is RGBA on transparent -> white -> (1 - 0.5) / 0.5 = 1
    assert first[:, 0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(shape_uris, [0], eval_transform(32, (0.5,) * 3, (0.5,) * 3))


def test_eval_geometry_is_square_resize_then_centre_crop(tmp_path: Path):
    # a 96x48 image: left half red, right half blue, a green bar near each short edge
    array = np.zeros((48, 96, 3), dtype=np.uint8)
    array[:, :48] = RED
    array[:, 48:] = BLUE
    array[:, :6] = array[:, -6:] = (0, 255, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    size = 44  # 1.125 * 44 = 49.5: the authors' int() gives 49 (round() would give 50)
    got = ImageDataset([str(path)], [0], eval_geometry(size))[0][0]
    tensor = v2.functional.pil_to_tensor(Image.fromarray(array))
    bicubic = v2.InterpolationMode.BICUBIC
    square = v2.functional.center_crop(v2.functional.resize(tensor, [49, 49], interpolation=bicubic, antialias=True), [size])
    shorter = v2.functional.center_crop(v2.functional.resize(tensor, 49, interpolation=bicubic, antialias=True), [size])
    assert got.shape == (3, size, size)
    assert torch.equal(got, square)
    assert not torch.equal(got, shorter)
    # the square resize keeps the whole width (both halves, squeezed); shorter-side + crop loses the green edges
    assert got[1, size // 2, 0] > 200 and got[0, size // 2, 2 * size // 5] > 200 and got[2, size // 2, 3 * size // 5] > 200
    assert shorter[1, size // 2, 0] < 50


def test_batched_normalisation_equals_the_per_image_transform(shape_uris: list[str]):
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    per_image = torch.stack([ImageDataset(shape_uris, [0] * 4, eval_transform(48, mean, std))[i][0] for i in range(4)])
    geometry = torch.stack([ImageDataset(shape_uris, [0] * 4, eval_geometry(48))[i][0] for i in range(4)])
    assert geometry.dtype == torch.uint8 and geometry.shape == (4, 3, 48, 48)
    assert torch.equal(normalize_batch(geometry, mean, std), per_image)  # bit for bit
