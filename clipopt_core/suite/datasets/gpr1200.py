"""GPR1200 (Schall et al. 2022): 12,000 images of 1,200 categories, 10 each, in one folder.

Official layout (https://visual-computing.com/files/GPR1200/GPR1200.zip, unpacked)::

    <root>/images/<category id>_<original name>.jpg      e.g. images/1043_1d2b9ba4ae5c.jpg

``root`` may also be the ``images`` folder itself (the authors' ``GPR1200('/path/GPR1200/images')``).
The category is the integer before the first ``_``. Every image is a query against all 12,000 (itself
counted as a hit, the GPR1200 protocol; see ``docs/method.md#evaluation``), so there is no split.
"""
from __future__ import annotations

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot
from clipopt_core.suite.types import ImageSet

FIX = ("download https://visual-computing.com/files/GPR1200/GPR1200.zip and unzip it so that "
       "<root>/images/<category>_<name>.jpg exist")


def load_gpr1200(root: str) -> ImageSet:
    """All GPR1200 images, labelled by category; class names are the category ids (``"0"`` … ``"1199"``).

    Images are ordered by (category, file name), the authors' order (they sort by category).
    """
    base = BenchmarkRoot(root, "GPR1200", FIX)
    folder = "images" if base.isdir("images") else ""
    paths = base.images_by_folder(folder).get("", [])
    if not paths:
        raise base.error(f"no images in {base.uri(folder)}")
    categories = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        head, sep, _ = name.partition("_")
        if not (sep and head.isdigit()):
            raise base.error(f"image {base.uri(path)} is not named <category id>_<name>.jpg")
        categories.append(int(head))
    order = sorted(range(len(paths)), key=lambda i: (categories[i], paths[i]))
    ids = sorted(set(categories))
    index = {category: i for i, category in enumerate(ids)}
    return ImageSet(name="gpr1200", uris=tuple(base.uri(paths[i]) for i in order),
                    labels=np.asarray([index[categories[i]] for i in order], dtype=np.int64),
                    class_names=tuple(str(category) for category in ids))
