"""ObjectNet 1.0 (Barbu et al. 2019), restricted to its 113 classes that overlap ImageNet-1k.

Official layout (``objectnet-1.0.zip`` from https://objectnet.dev/, unpacked)::

    <root>/objectnet-1.0/images/<folder>/<hash>.png                 313 class folders
    <root>/objectnet-1.0/mappings/folder_to_objectnet_label.json    {"alarm_clock": "Alarm clock", …}
    <root>/objectnet-1.0/mappings/objectnet_to_imagenet_1k.json     {"Alarm clock": "analog clock; digital clock", …}

``root`` may also be the ``objectnet-1.0`` folder itself. As in clip_benchmark, the classes are the
ObjectNet labels that map to ImageNet (lower-cased for prompts), in sorted folder order; images of the
other 200 classes are left out. Every ObjectNet image has a 1-pixel red border that the ObjectNet
authors' evaluation crops away: ``crops`` cut it off (``crop_border=False`` keeps whole images).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot, trimmed_boxes
from clipopt_core.suite.types import ImageSet

FIX = ("download objectnet-1.0.zip from https://objectnet.dev/download.html and unzip it (password in its "
       "instructions) so that <root>/objectnet-1.0/images/ and <root>/objectnet-1.0/mappings/ exist")
BORDER_PX = 1


def _json(base: BenchmarkRoot, rel: str) -> dict[str, Any]:
    try:
        loaded = json.loads(base.read_text(rel))
    except json.JSONDecodeError as error:
        raise base.error(f"{base.uri(rel)}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
        raise base.error(f"{base.uri(rel)}: expected one JSON object of strings")
    return loaded


def load_objectnet(root: str, crop_border: bool = True) -> ImageSet:
    """ObjectNet images of the 113 ImageNet-overlapping classes; ``crops`` [N, 4] remove the 1-px border."""
    base = BenchmarkRoot(root, "ObjectNet", FIX)
    top = "objectnet-1.0" if base.isdir("objectnet-1.0") else ""
    prefix = f"{top}/" if top else ""
    folder_label = _json(base, f"{prefix}mappings/folder_to_objectnet_label.json")
    to_imagenet = _json(base, f"{prefix}mappings/objectnet_to_imagenet_1k.json")
    unknown = sorted(set(to_imagenet) - set(folder_label.values()))
    if unknown:
        raise base.error(f"labels {unknown[:3]} of objectnet_to_imagenet_1k.json name no folder in "
                         "folder_to_objectnet_label.json")
    folders = sorted(folder for folder, label in folder_label.items() if label in to_imagenet)
    index = {folder: i for i, folder in enumerate(folders)}
    grouped = base.images_by_folder(base.require(f"{prefix}images", "folder"))
    missing = [folder for folder in folders if folder not in grouped]
    if missing:
        raise base.error(f"class folders {[base.uri(f'{prefix}images/{f}') for f in missing[:3]]} are missing or empty")
    paths = [path for folder in folders for path in grouped[folder]]
    labels = np.asarray([index[folder] for folder in folders for _ in grouped[folder]], dtype=np.int64)
    crops = trimmed_boxes(base.image_sizes(paths), *(BORDER_PX,) * 4) if crop_border else None
    return ImageSet(name="objectnet", uris=tuple(base.uri(p) for p in paths), labels=labels,
                    class_names=tuple(folder_label[folder].lower() for folder in folders), crops=crops)
