"""FGVC-Aircraft 2013b (Maji et al. 2013): 10,000 aircraft photos of 100 variants.

Official layout (``fgvc-aircraft-2013b.tar.gz`` from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/)::

    <root>/data/variants.txt                     one variant per line, e.g. "707-320" (100 lines: class order)
    <root>/data/images_variant_trainval.txt      "<image id> <variant name, may contain spaces>"
    <root>/data/images_variant_test.txt
    <root>/data/images/<image id>.jpg

``root`` may also be the ``fgvc-aircraft-2013b`` folder's parent. Every image carries a 20-pixel
copyright banner along its bottom edge, which the dataset's README says to remove: ``crops`` cut it off
(``crop_banner=False`` keeps whole images).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot, trimmed_boxes
from clipopt_core.suite.types import ImageSet

FIX = ("download fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and "
       "unpack it so that <root>/data/variants.txt, data/images_variant_<split>.txt and data/images/ exist")
BANNER_PX = 20
SPLITS = ("trainval", "test")


def load_aircraft(root: str, split: Literal["trainval", "test"] = "test", crop_banner: bool = True) -> ImageSet:
    """The ``split`` images labelled by variant (ids = line order of ``variants.txt``); crops drop the banner."""
    if split not in SPLITS:
        raise ValueError(f"FGVC-Aircraft split must be one of {SPLITS}, got {split!r}")
    base = BenchmarkRoot(root, "FGVC-Aircraft", FIX)
    data = "fgvc-aircraft-2013b/data" if base.isdir("fgvc-aircraft-2013b/data") else "data"
    variants = [line.strip() for line in base.read_text(f"{data}/variants.txt").splitlines() if line.strip()]
    index = {variant: i for i, variant in enumerate(variants)}
    listing = f"{data}/images_variant_{split}.txt"
    paths: list[str] = []
    labels: list[int] = []
    for number, (image_id, variant) in base.rows(listing, 2, split_once=True):
        if variant not in index:
            raise base.error(f"{base.uri(listing)}:{number}: variant {variant!r} is not in "
                             f"{base.uri(f'{data}/variants.txt')}")
        paths.append(f"{data}/images/{image_id}.jpg")
        labels.append(index[variant])
    base.require(f"{data}/images", "folder")
    crops = trimmed_boxes(base.image_sizes(paths), 0, 0, 0, BANNER_PX) if crop_banner else None
    return ImageSet(name=f"aircraft_{split}", uris=tuple(base.uri(p) for p in paths),
                    labels=np.asarray(labels, dtype=np.int64), class_names=tuple(variants), crops=crops)
