"""ImageNet-1k (ILSVRC2012) train/val, ImageNet-Sketch and ImageNet-A, labelled in ImageNet-1k class ids.

Class ids are the positions of the sorted wnids (the torchvision / timm order); the names are OpenAI's
curated CLIP class names (``imagenet_classes.tsv``: ``<wnid>\\t<name>``, 1000 lines in id order, the same
names as ``open_clip.IMAGENET_CLASSNAMES``). ImageNet-A covers 200 of the classes
(``imagenet_a_wnids.txt``); zero-shot restricts the logits to :func:`imagenet_a_class_ids`, as is standard.

Official layouts (``root`` holds ``train/`` and ``val/``, or the Kaggle ``ILSVRC/Data/CLS-LOC/``)::

    <root>/train/<wnid>/<name>.JPEG                    ILSVRC2012_img_train.tar, class tars unpacked
    <root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG          val sorted into wnid folders (valprep.sh), or
    <root>/val/ILSVRC2012_val_<n>.JPEG + <root>/LOC_val_solution.csv    flat val + Kaggle ground truth, or
    <root>/val/ILSVRC2012_val_<n>.JPEG + <root>/ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt,
        meta.mat}                                   flat val + the official devkit (needs scipy to read meta.mat)
    <sketch root>/<wnid>/*.JPEG      (or <root>/sketch/<wnid>/…)        ImageNet-Sketch
    <imagenet-a root>/<wnid>/*.jpg   (or <root>/imagenet-a/<wnid>/…)   ImageNet-A (200 wnid folders)
"""
from __future__ import annotations

import io
from importlib import resources
from typing import Literal

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot
from clipopt_core.suite.types import ImageSet


def _data_lines(name: str) -> list[str]:
    text = resources.files("clipopt_core.suite.datasets").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


IMAGENET_WNIDS: tuple[str, ...] = tuple(line.split("\t")[0] for line in _data_lines("imagenet_classes.tsv"))
IMAGENET_CLASSNAMES: tuple[str, ...] = tuple(line.split("\t")[1] for line in _data_lines("imagenet_classes.tsv"))
IMAGENET_A_WNIDS: tuple[str, ...] = tuple(_data_lines("imagenet_a_wnids.txt"))
WNID_INDEX = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}

IMAGENET_FIX = ("download ILSVRC2012 (https://image-net.org/challenges/LSVRC/2012/ or the Kaggle "
                "imagenet-object-localization-challenge) and unpack it so that <root>/train/<wnid>/*.JPEG and "
                "<root>/val/<wnid>/*.JPEG exist (or a flat <root>/val/ with <root>/LOC_val_solution.csv or the "
                "unpacked <root>/ILSVRC2012_devkit_t12)")
SKETCH_FIX = ("download ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch) and unpack it so that "
              "<root>/<wnid>/*.JPEG (or <root>/sketch/<wnid>/*.JPEG) exist")
A_FIX = ("download imagenet-a.tar (https://github.com/hendrycks/natural-adv-examples) and unpack it so that "
         "<root>/<wnid>/*.jpg (or <root>/imagenet-a/<wnid>/*.jpg) exist")


def imagenet_a_class_ids() -> np.ndarray:
    """[200] int64 ImageNet-1k class ids of the ImageNet-A classes, ascending (restrict zero-shot logits to them)."""
    return np.asarray([WNID_INDEX[wnid] for wnid in IMAGENET_A_WNIDS], dtype=np.int64)


def _wnid_folders(base: BenchmarkRoot, folder: str, name: str, allowed: frozenset[str] | None = None) -> ImageSet:
    """Images in ``<folder>/<wnid>/``, labelled by the wnid's ImageNet-1k id; other folders are layout errors."""
    grouped = base.images_by_folder(folder)
    loose = grouped.pop("", [])
    if loose:
        raise base.error(f"{base.uri(loose[0])} lies outside any <wnid> folder")
    if not grouped:
        raise base.error(f"{base.uri(folder)} holds no <wnid>/ image folders")
    uris: list[str] = []
    labels: list[int] = []
    for wnid, paths in grouped.items():
        if wnid not in WNID_INDEX or (allowed is not None and wnid not in allowed):
            where = base.uri(f"{folder}/{wnid}" if folder else wnid)
            raise base.error(f"folder {where} is not a class (wnid) of {name}")
        uris += [base.uri(path) for path in paths]
        labels += [WNID_INDEX[wnid]] * len(paths)
    return ImageSet(name=name, uris=tuple(uris), labels=np.asarray(labels, dtype=np.int64),
                    class_names=IMAGENET_CLASSNAMES)


DEVKIT = "ILSVRC2012_devkit_t12/data"
LOC_SOLUTION = "LOC_val_solution.csv"


def _loc_solution_truth(base: BenchmarkRoot) -> tuple[str, dict[str, str]]:
    """Image stem → wnid from the Kaggle ``LOC_val_solution.csv`` (``ImageId,PredictionString``, header first)."""
    truth: dict[str, str] = {}
    for number, line in enumerate(base.read_text(LOC_SOLUTION).splitlines(), start=1):
        if number == 1 or not line.strip():
            continue
        image_id, sep, boxes = line.partition(",")
        wnid = boxes.split(" ", 1)[0]
        if not sep or wnid not in WNID_INDEX:
            raise base.error(f"{base.uri(LOC_SOLUTION)}:{number}: expected '<ImageId>,<wnid> <box> …', got {line!r}")
        truth[image_id] = wnid
    return base.uri(LOC_SOLUTION), truth


def _devkit_truth(base: BenchmarkRoot) -> tuple[str, dict[str, str]]:
    """Image stem → wnid from the official devkit: line n of the ground truth is ``ILSVRC2012_val_<n>``'s
    ILSVRC2012_ID, which ``meta.mat`` (``synsets``: ID, WNID, …, num_children) maps to a wnid."""
    try:
        from scipy.io import loadmat  # the devkit's .mat format; scipy is needed only for this layout
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise base.error(f"reading {base.uri(DEVKIT)}/meta.mat needs scipy (pip install scipy)") from None
    gt_rel, meta_rel = f"{DEVKIT}/ILSVRC2012_validation_ground_truth.txt", f"{DEVKIT}/meta.mat"
    try:
        synsets = loadmat(io.BytesIO(base.read_bytes(meta_rel)), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (MatReadError, ValueError, TypeError, KeyError, IndexError) as error:
        raise base.error(f"{base.uri(meta_rel)} is not the devkit's synset table ({error!r})") from error
    truth: dict[str, str] = {}
    for number, (value,) in base.rows(gt_rel, 1):
        wnid = id_to_wnid.get(base.int_field(gt_rel, number, value), "")
        if wnid not in WNID_INDEX:
            raise base.error(f"{base.uri(gt_rel)}:{number}: ILSVRC2012_ID {value} is not a leaf synset of meta.mat")
        truth[f"ILSVRC2012_val_{number:08d}"] = wnid
    return base.uri(gt_rel), truth


def _flat_val(base: BenchmarkRoot, folder: str, paths: list[str]) -> ImageSet:
    """Flat ``val/`` images labelled from ``LOC_val_solution.csv`` (Kaggle) or else the official devkit."""
    if base.exists(LOC_SOLUTION):
        source, truth = _loc_solution_truth(base)
    elif base.exists(f"{DEVKIT}/ILSVRC2012_validation_ground_truth.txt"):
        source, truth = _devkit_truth(base)
    else:
        raise base.error(f"{base.uri(folder)} holds images directly (flat val) but neither {base.uri(LOC_SOLUTION)} "
                         f"nor the devkit {base.uri(DEVKIT)}/ILSVRC2012_validation_ground_truth.txt is there")
    labels = []
    for path in paths:
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if stem not in truth:
            raise base.error(f"image {base.uri(path)} has no row in {source}")
        labels.append(WNID_INDEX[truth[stem]])
    return ImageSet(name="imagenet_val", uris=tuple(base.uri(p) for p in paths),
                    labels=np.asarray(labels, dtype=np.int64), class_names=IMAGENET_CLASSNAMES)


def load_imagenet(root: str, split: Literal["train", "val"] = "val") -> ImageSet:
    """ILSVRC2012 ``split`` with 1000-way labels.

    ``val`` may be wnid folders, or flat with ``LOC_val_solution.csv`` or the ``ILSVRC2012_devkit_t12``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
    base = BenchmarkRoot(root, "ImageNet-1k", IMAGENET_FIX)
    folder = next((f for f in (split, f"ILSVRC/Data/CLS-LOC/{split}") if base.isdir(f)), None)
    if folder is None:
        raise base.error(f"missing folder {base.uri(split)} (nor {base.uri(f'ILSVRC/Data/CLS-LOC/{split}')})")
    if split == "val" and not base.subfolders(folder):
        return _flat_val(base, folder, base.images_by_folder(folder).get("", []))
    return _wnid_folders(base, folder, f"imagenet_{split}")


def _dataset_folder(base: BenchmarkRoot, wrapper: str) -> str:
    """``wrapper`` when the archive's top folder (``sketch``, ``imagenet-a``) sits under the root, else the root."""
    return wrapper if base.isdir(wrapper) else ""


def load_imagenet_sketch(root: str) -> ImageSet:
    """ImageNet-Sketch (50,889 sketches, 1000 wnid folders), labelled in ImageNet-1k ids."""
    base = BenchmarkRoot(root, "ImageNet-Sketch", SKETCH_FIX)
    return _wnid_folders(base, _dataset_folder(base, "sketch"), "imagenet_sketch")


def load_imagenet_a(root: str) -> ImageSet:
    """ImageNet-A (7,500 images, 200 wnid folders), labelled in ImageNet-1k ids (see :func:`imagenet_a_class_ids`)."""
    base = BenchmarkRoot(root, "ImageNet-A", A_FIX)
    return _wnid_folders(base, _dataset_folder(base, "imagenet-a"), "imagenet_a", frozenset(IMAGENET_A_WNIDS))
