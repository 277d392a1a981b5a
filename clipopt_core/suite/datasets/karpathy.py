"""Flickr30k and MS-COCO with Karpathy's splits (``dataset_flickr30k.json`` / ``dataset_coco.json``).

Expected root layout (the JSONs from Karpathy's ``caption_datasets.zip``, the images from each dataset)::

    flickr30k:  <root>/dataset_flickr30k.json   <root>/flickr30k-images/<filename>
    coco:       <root>/dataset_coco.json        <root>/<filepath>/<filename>   (filepath: val2014 or train2014)

JSON: ``{"images": [{"filename", "filepath" (coco), "split", "sentences": [{"raw"}, …]}, …]}``. The
test splits hold 1,000 (Flickr30k) and 5,000 (COCO) images; T2I uses 5 captions per image (the
first 5; some COCO images have 6-7), as the paper reports (``captions_per_image=None`` keeps all).
"""
from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot
from clipopt_core.suite.types import CaptionSet

DATASETS = ("flickr30k", "coco")
SPLITS = ("train", "restval", "val", "test")


def _fix(dataset: str) -> str:
    images = ("flickr30k-images/ (Flickr30k images from https://shannon.cs.illinois.edu/DenotationGraph/)"
              if dataset == "flickr30k" else "val2014/ and train2014/ (https://cocodataset.org/#download)")
    return (f"download caption_datasets.zip (Karpathy splits, https://cs.stanford.edu/people/karpathy/deepimagesent/) "
            f"and unpack it so that <root>/dataset_{dataset}.json exists, next to {images}")


def _sentences(base: BenchmarkRoot, rel: str, position: int, entry: Any) -> tuple[str, list[str]]:
    """``(image path relative to root, raw captions)`` of ``images[position]``, or a layout error naming it."""
    try:
        filename = entry["filename"]
        folder = entry.get("filepath") or "flickr30k-images"
        raws = [sentence["raw"].strip() for sentence in entry["sentences"]]
    except (KeyError, TypeError, AttributeError) as error:
        raise base.error(f"{base.uri(rel)}: images[{position}] lacks filename/sentences[].raw ({error!r})") from None
    return f"{folder}/{filename}", raws


def load_karpathy(root: str, dataset: Literal["flickr30k", "coco"], split: str = "test",
                  captions_per_image: int | None = 5) -> CaptionSet:
    """Images of ``split`` and their captions; ``caption_image`` [T] points each caption at its image."""
    if dataset not in DATASETS or split not in SPLITS:
        raise ValueError(f"dataset must be one of {DATASETS} and split one of {SPLITS}, got {dataset!r}/{split!r}")
    if captions_per_image is not None and captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1 or None (all), got {captions_per_image}")
    base = BenchmarkRoot(root, f"{dataset} (Karpathy)", _fix(dataset))
    rel = f"dataset_{dataset}.json"
    try:
        images = json.loads(base.read_text(rel))["images"]
    except json.JSONDecodeError as error:
        raise base.error(f"{base.uri(rel)}:{error.lineno}: not valid JSON ({error.msg})") from error
    except (KeyError, TypeError):
        raise base.error(f"{base.uri(rel)}: expected a JSON object with an 'images' list") from None
    paths: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for position, entry in enumerate(images):
        if not isinstance(entry, dict) or entry.get("split") != split:
            continue
        path, raws = _sentences(base, rel, position, entry)
        kept = raws[:captions_per_image] if captions_per_image is not None else raws
        caption_image += [len(paths)] * len(kept)
        captions += kept
        paths.append(path)
    if not paths:
        raise base.error(f"{base.uri(rel)} holds no images of split {split!r}")
    for folder in sorted({path.rsplit("/", 1)[0] for path in paths}):
        base.require(folder, "folder")
    return CaptionSet(name=f"{dataset}_{split}", images=tuple(base.uri(p) for p in paths), captions=tuple(captions),
                      caption_image=np.asarray(caption_image, dtype=np.int64))
