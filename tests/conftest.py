"""Shared fixtures: tiny drawn-shape image sources and the tiny registered model."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
import zlib
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(1)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "orange": (240, 150, 30)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, colour: tuple[int, int, int], seed: int, size: int = 40) -> Image.Image:
    """One RGBA drawing of ``shape`` with a random offset, scale and background tint."""
    rng = random.Random(seed)
    image = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    draw = ImageDraw.Draw(image)
    margin = rng.randint(3, 9)
    box = (margin + rng.randint(-2, 2), margin + rng.randint(-2, 2), size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    else:
        middle = size // 2
        draw.rectangle((box[0], middle - 4, box[2], middle + 4), fill=colour)
        draw.rectangle((middle - 4, box[1], middle + 4, box[3]), fill=colour)
    return image


def write_shapes_source(root: Path, *, per_class: int = 3, layout: str = "manifest", seed: int = 0) -> Path:
    """A labelled source of 16 classes ('red circle' …) × ``per_class`` images, with captions."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            label = f"{colour} {shape}"
            for copy in range(per_class):
                relative = f"{label.replace(' ', '_')}/{copy}.png"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                draw_shape(shape, rgb, seed * 1000 + zlib.crc32(label.encode()) % 997 + copy).save(root / relative)
                rows.append({"path": relative, "label": label, "caption": f"a {label}", "category": shape,
                             "source": "shapes-a" if copy % 2 else "shapes-b"})
    if layout == "manifest":
        pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


def write_caption_source(root: Path, *, count: int = 24, seed: int = 1) -> Path:
    """Image-caption pairs (``path``, ``caption``) for realignment and the mining pool."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for number in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        relative = f"pair_{number}.png"
        draw_shape(shape, COLOURS[colour], seed * 7919 + number).save(root / relative)
        rows.append({"path": relative, "caption": f"a drawing of a {colour} {shape} number {number}"})
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


@pytest.fixture(scope="session")
def shapes_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_source(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def caption_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caption_source(tmp_path_factory.mktemp("captions"))
