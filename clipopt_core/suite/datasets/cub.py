"""CUB-200-2011 (Wah et al. 2011): 11,788 bird photos of 200 species with the official train/test split.

Official layout (``CUB_200_2011.tgz`` from https://www.vision.caltech.edu/datasets/cub_200_2011/)::

    <root>/images.txt               "<image id> <relative path>"   e.g. "1 001.Black_footed_Albatross/x.jpg"
    <root>/image_class_labels.txt   "<image id> <class id>"        class ids 1..200
    <root>/train_test_split.txt     "<image id> <1 = train, 0 = test>"
    <root>/classes.txt              "<class id> <folder name>"      e.g. "1 001.Black_footed_Albatross"
    <root>/images/<relative path>
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot, clean_class_name
from clipopt_core.suite.types import ImageSet

FIX = ("download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and unpack it so "
       "that <root>/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt and images/ exist")
SPLIT_FLAGS = {"train": (1,), "test": (0,), "all": (0, 1)}


def _id_table(base: BenchmarkRoot, rel: str, integer: bool = False) -> dict[int, str | int]:
    """``"<id> <value>"`` rows as id → value (an int when ``integer``); bad rows name file:line."""
    table: dict[int, str | int] = {}
    for number, (key, value) in base.rows(rel, 2):
        image_id = base.int_field(rel, number, key)
        if image_id in table:
            raise base.error(f"{base.uri(rel)}:{number}: id {image_id} listed twice")
        table[image_id] = base.int_field(rel, number, value) if integer else value
    return table


def load_cub(root: str, split: Literal["train", "test", "all"] = "test") -> ImageSet:
    """The CUB images of ``split`` (official ``train_test_split.txt``), labels 0..199 = class id - 1.

    Class names are cleaned folder names (``"001.Black_footed_Albatross"`` → ``"Black footed Albatross"``).
    """
    if split not in SPLIT_FLAGS:
        raise ValueError(f"CUB split must be one of {sorted(SPLIT_FLAGS)}, got {split!r}")
    base = BenchmarkRoot(root, "CUB-200-2011", FIX)
    classes = _id_table(base, "classes.txt")
    images = _id_table(base, "images.txt")
    labels = _id_table(base, "image_class_labels.txt", integer=True)
    flags = _id_table(base, "train_test_split.txt", integer=True)
    base.require("images", "folder")
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise base.error(f"{base.uri('classes.txt')} must number its classes 1..{len(classes)}")
    checks = (("image_class_labels.txt", labels, classes, "a class id of classes.txt"),
              ("train_test_split.txt", flags, (0, 1), "1 (train) or 0 (test)"))
    for rel, table, allowed, expected in checks:
        for image_id in images:
            if table.get(image_id) not in allowed:
                raise base.error(f"{base.uri(rel)}: image id {image_id} of images.txt has no row or the value "
                                 f"{table.get(image_id)!r}; expected {expected}")
    chosen = [image_id for image_id in sorted(images) if flags[image_id] in SPLIT_FLAGS[split]]
    return ImageSet(name=f"cub200_{split}", uris=tuple(base.uri(f"images/{images[i]}") for i in chosen),
                    labels=np.asarray([labels[i] for i in chosen], dtype=np.int64) - 1,
                    class_names=tuple(clean_class_name(str(classes[c])) for c in sorted(classes)))

