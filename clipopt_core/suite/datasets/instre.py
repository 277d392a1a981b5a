"""INSTRE (Wang & Jiang 2015): 28,543 images of 250 object classes in three subsets.

Official layout (http://123.57.42.89/instre/home.html, ``INSTRE_release`` unpacked)::

    <root>/INSTRE-S1/<object folder>/<nnn>.jpg     100 objects, e.g. INSTRE-S1/01a_canada_book/001.jpg
    <root>/INSTRE-S2/<object folder>/<nnn>.jpg     100 objects
    <root>/INSTRE-M/<pair folder>/<nnn>.jpg         50 folders, each image showing two S1 objects

The per-image bounding-box ``.txt`` files beside the images are not read (whole images are embedded).
The class of an image is its folder, so an INSTRE-M pair is a class of its own and is not a positive
for queries of its two S1 objects (GPR1200-style mAP over folder labels; see ``docs/method.md#evaluation``).
"""
from __future__ import annotations

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot
from clipopt_core.suite.types import ImageSet

SUBSETS = ("INSTRE-S1", "INSTRE-S2", "INSTRE-M")
FIX = ("download INSTRE from http://123.57.42.89/instre/home.html and unpack it so that "
       "<root>/INSTRE-S1, <root>/INSTRE-S2 and <root>/INSTRE-M hold one folder per object")


def load_instre(root: str) -> ImageSet:
    """All INSTRE images; class = ``"<subset>/<object folder>"`` (e.g. ``"INSTRE-S1/01a_canada_book"``).

    Classes are ordered by subset (S1, S2, M) then folder name; images by path.
    """
    base = BenchmarkRoot(root, "INSTRE", FIX)
    uris: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    for subset in SUBSETS:
        grouped = base.images_by_folder(base.require(subset, "folder"))
        loose = grouped.pop("", [])
        if loose:
            raise base.error(f"{base.uri(loose[0])} lies directly in {subset}, outside any object folder")
        if not grouped:
            raise base.error(f"{base.uri(subset)} holds no object folders with images")
        for folder, paths in grouped.items():
            if "/" in folder:
                raise base.error(f"nested folder {base.uri(subset + '/' + folder)}; expected {subset}/<object>/<image>")
            labels += [len(class_names)] * len(paths)
            uris += [base.uri(path) for path in paths]
            class_names.append(f"{subset}/{folder}")
    return ImageSet(name="instre", uris=tuple(uris), labels=np.asarray(labels, dtype=np.int64),
                    class_names=tuple(class_names))
