"""Tiny benchmark sets for the suite's asset and CLI tests, and a stand-in for the loaders that read them.

The loaders of the official layouts (:mod:`clipopt_core.suite.datasets`) have their own tests; these tests
exercise what runs around them, so :func:`fake_loaders` serves hand-built sets by loader name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from clipopt_core.suite.types import BenchmarkLayoutError, CaptionSet, ImageSet
from tests.conftest import COLOURS, SHAPES, draw_shape


def write_image_set(root: Path, name: str = "gpr") -> ImageSet:
    """4 shape classes × 3 colours of 40-px drawings under ``root``, labelled by shape."""
    root.mkdir(parents=True, exist_ok=True)
    uris, labels = [], []
    for label, shape in enumerate(SHAPES):
        for n, (colour, rgb) in enumerate(list(COLOURS.items())[:3]):
            path = root / f"{shape}_{colour}.png"
            draw_shape(shape, rgb, seed=label * 10 + n).save(path)
            uris.append(str(path))
            labels.append(label)
    return ImageSet(name, tuple(uris), np.array(labels, dtype=np.int64), SHAPES)


def write_caption_set(root: Path) -> CaptionSet:
    """6 images with 5 captions each (Karpathy style)."""
    root.mkdir(parents=True, exist_ok=True)
    images, captions, owner = [], [], []
    for index, (shape, colour) in enumerate([(s, c) for s in SHAPES[:3] for c in list(COLOURS)[:2]]):
        path = root / f"pair_{index}.png"
        draw_shape(shape, COLOURS[colour], seed=100 + index).save(path)
        images.append(str(path))
        for n in range(5):
            captions.append(f"a {colour} {shape}, caption {n}")
            owner.append(index)
    return CaptionSet("flickr30k", tuple(images), tuple(captions), np.array(owner, dtype=np.int64))


def fake_loaders(monkeypatch: pytest.MonkeyPatch, sets: dict[str, Any]) -> list[tuple[str, tuple]]:
    """Serve ``sets`` ``{loader name: set}`` in place of :mod:`clipopt_core.suite.datasets`; returns the call log.

    A root folder that does not exist raises :class:`BenchmarkLayoutError`, as the real loaders do.
    """
    calls: list[tuple[str, tuple]] = []

    def loader(name: str) -> Callable[..., Any]:
        def load(root: str, *args: Any) -> Any:
            calls.append((name, (root, *args)))
            if not Path(root).is_dir():
                raise BenchmarkLayoutError(f"{root} is not a folder; point the root at the benchmark's folder")
            return sets[name]
        return load

    monkeypatch.setattr("clipopt_core.suite.columns.loader", loader)
    return calls
