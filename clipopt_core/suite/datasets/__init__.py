"""Loaders of the paper's benchmarks (Table 1) from their *official* on-disk layouts, local or ``s3://``.

One module per benchmark family (timm style); ``_layout`` and ``_restricted_pickle`` are the framework.
Each loader takes the folder the official archive was unpacked into and returns the types of
:mod:`clipopt_core.suite.types`; a missing root, file or malformed row raises
:class:`~clipopt_core.suite.types.BenchmarkLayoutError` naming the path (and line) and how to get the
official layout. Loaders list files and read the small annotation files only; images are opened later,
by the protocols (except the header reads that size the ObjectNet and FGVC-Aircraft ``crops``).

``LOADERS`` maps each benchmark key to its loader, called ``LOADERS[key](root, **options)``; with the
root alone every loader returns the benchmark's evaluation set (the test/val split, first option below):

==================  ==============================================  ==========================
key                 loader (options)                                returns
==================  ==============================================  ==========================
gpr1200             load_gpr1200(root)                              ImageSet (one set, no split)
instre              load_instre(root)                               ImageSet (one set, no split)
cub200              load_cub(root, split="test"|"train"|"all")      ImageSet
roxford5k           load_revisited(root, name="roxford5k")          RevisitedSet
rparis6k            load_revisited(root, name="rparis6k")           RevisitedSet
imagenet            load_imagenet(root, split="val"|"train")        ImageSet (1000 classes)
imagenet_sketch     load_imagenet_sketch(root)                      ImageSet (1000 classes)
imagenet_a          load_imagenet_a(root)                           ImageSet (1000 names; 200 used:
                                                                    imagenet_a_class_ids())
objectnet           load_objectnet(root, crop_border=True)          ImageSet (113 classes, crops)
aircraft            load_aircraft(root, split="test"|"trainval",    ImageSet (100 variants, crops)
                    crop_banner=True)
flickr30k           load_karpathy(root, dataset="flickr30k",        CaptionSet
                    split="test", captions_per_image=5)
coco                load_karpathy(root, dataset="coco", …)          CaptionSet
==================  ==============================================  ==========================
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from clipopt_core.suite.datasets.aircraft import load_aircraft
from clipopt_core.suite.datasets.cub import load_cub
from clipopt_core.suite.datasets.gpr1200 import load_gpr1200
from clipopt_core.suite.datasets.imagenet import (
    IMAGENET_A_WNIDS,
    IMAGENET_CLASSNAMES,
    IMAGENET_WNIDS,
    imagenet_a_class_ids,
    load_imagenet,
    load_imagenet_a,
    load_imagenet_sketch,
)
from clipopt_core.suite.datasets.instre import load_instre
from clipopt_core.suite.datasets.karpathy import load_karpathy
from clipopt_core.suite.datasets.objectnet import load_objectnet
from clipopt_core.suite.datasets.revisited import load_revisited

LOADERS: dict[str, Callable[..., Any]] = {
    "gpr1200": load_gpr1200,
    "instre": load_instre,
    "cub200": load_cub,
    "roxford5k": partial(load_revisited, name="roxford5k"),
    "rparis6k": partial(load_revisited, name="rparis6k"),
    "imagenet": load_imagenet,
    "imagenet_sketch": load_imagenet_sketch,
    "imagenet_a": load_imagenet_a,
    "objectnet": load_objectnet,
    "aircraft": load_aircraft,
    "flickr30k": partial(load_karpathy, dataset="flickr30k"),
    "coco": partial(load_karpathy, dataset="coco"),
}

__all__ = [
    "IMAGENET_A_WNIDS", "IMAGENET_CLASSNAMES", "IMAGENET_WNIDS", "LOADERS", "imagenet_a_class_ids",
    "load_aircraft", "load_cub", "load_gpr1200", "load_imagenet", "load_imagenet_a", "load_imagenet_sketch",
    "load_instre", "load_karpathy", "load_objectnet", "load_revisited",
]
