"""The 14 columns of Table 1 as data: name, group, the roots they read, the loader call and the protocol.

A column needs one or more *roots* (a benchmark's folder in its official layout, local or ``s3://``),
named by the keys of :data:`ROOTS`; a roots file maps those keys to folders. A column whose root is
not configured is skipped with a message naming the key and what it must point to; the others run.
The loaders are :mod:`clipopt_core.suite.datasets` (imported when a column loads, through :func:`loader`).
docs/method.md#benchmark-suite lists the columns and their protocols.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

from clipopt_core.evaluate.protocol import OPENAI_TEMPLATES
from clipopt_core.suite import protocols
from clipopt_core.suite.embedding import SuiteEmbedder

Group = Literal["i2i", "knn", "zs", "t2i"]
GROUPS: tuple[Group, ...] = ("i2i", "knn", "zs", "t2i")
GROUP_LABELS = {"i2i": "I2I", "knn": "kNN", "zs": "ZS", "t2i": "T2I"}

# root key -> what it must point to (the skip message and the roots file's documentation)
ROOTS: dict[str, str] = {
    "gpr1200": "the GPR1200 images folder",
    "instre": "the INSTRE folder (INSTRE-S1, INSTRE-S2, INSTRE-M)",
    "cub200": "the CUB_200_2011 folder (images.txt, image_class_labels.txt, train_test_split.txt, images/)",
    "roxford5k": "the revisited Oxford folder (gnd_roxford5k.pkl and jpg/)",
    "imagenet": "the ILSVRC2012 folder (train/ and val/, one folder per wnid)",
    "imagenet_sketch": "the ImageNet-Sketch folder (one folder per wnid)",
    "imagenet_a": "the ImageNet-A folder (200 wnid folders)",
    "objectnet": "the ObjectNet folder (images/ and mappings/)",
    "aircraft": "the FGVC-Aircraft data folder (images_variant_*.txt, images/)",
    "flickr30k": "the Flickr30k folder (dataset_flickr30k.json and the images)",
    "coco": "the COCO folder (dataset_coco.json, train2014/ and val2014/)",
}


@dataclass(frozen=True)
class SuiteOptions:
    """Protocol settings (the paper's defaults): zero-shot prompts, kNN k and temperature."""

    templates: tuple[str, ...] = OPENAI_TEMPLATES
    knn_k: int = 21
    knn_temperature: float = 0.1


@dataclass(frozen=True)
class Column:
    """One Table 1 column.

    Attributes:
        name: partition key and result key (``i2i_gpr1200``).
        label: the paper's header (``GPR1200``).
        group: ``i2i``, ``knn``, ``zs`` or ``t2i``.
        roots: the :data:`ROOTS` keys it reads.
        metric: which of the protocol's outputs is the column (``map``, ``medium``, ``top1``, ``r5``).
        load: roots mapping → the loaded benchmark (what ``evaluate`` takes).
        evaluate: ``(embedder, benchmark, options)`` → per-query scores ``{metric: [Q] float64}``
            (:data:`clipopt_core.suite.protocols.Scores`; the column's value is their mean).
    """

    name: str
    label: str
    group: Group
    roots: tuple[str, ...]
    metric: str
    load: Callable[[Mapping[str, str]], Any]
    evaluate: Callable[[SuiteEmbedder, Any, SuiteOptions], protocols.Scores]

    def missing(self, roots: Mapping[str, str]) -> str | None:
        """Why this column cannot run with ``roots`` (``None`` when every root it needs is set)."""
        unset = [key for key in self.roots if not roots.get(key)]
        if not unset:
            return None
        return "; ".join(f"set roots.{key} to {ROOTS[key]}" for key in unset) + f" to evaluate {self.name}"


def loader(name: str) -> Callable[..., Any]:
    """The loader ``clipopt_core.suite.datasets.<name>`` (imported on first use)."""
    module = importlib.import_module("clipopt_core.suite.datasets")
    return getattr(module, name)


def _i2i(key: str, function: str, *args: Any) -> Callable[[Mapping[str, str]], Any]:
    return lambda roots: loader(function)(roots[key], *args)


def _knn(train: Callable[[Mapping[str, str]], Any],
         test: Callable[[Mapping[str, str]], Any]) -> Callable[[Mapping[str, str]], Any]:
    return lambda roots: (train(roots), test(roots))


_IMAGENET_TRAIN = _i2i("imagenet", "load_imagenet", "train")


def _eval_i2i(embedder: SuiteEmbedder, images: Any, options: SuiteOptions) -> protocols.Scores:
    return protocols.evaluate_i2i(embedder, images)


def _eval_revisited(embedder: SuiteEmbedder, revisited: Any, options: SuiteOptions) -> protocols.Scores:
    return protocols.evaluate_revisited(embedder, revisited)


def _eval_knn(embedder: SuiteEmbedder, sets: Any, options: SuiteOptions) -> protocols.Scores:
    database, queries = sets
    return protocols.evaluate_knn(embedder, database, queries, k=options.knn_k, temperature=options.knn_temperature)


def _eval_zero_shot(embedder: SuiteEmbedder, images: Any, options: SuiteOptions) -> protocols.Scores:
    return protocols.evaluate_zero_shot(embedder, images, templates=options.templates)


def _eval_zero_shot_imagenet_a(embedder: SuiteEmbedder, images: Any, options: SuiteOptions) -> protocols.Scores:
    """Zero-shot among ImageNet-A's 200 classes of the 1000 (``imagenet_a_class_ids``), as is standard."""
    return protocols.evaluate_zero_shot(embedder, images, templates=options.templates,
                                        classes=[int(c) for c in loader("imagenet_a_class_ids")()])


def _eval_t2i(embedder: SuiteEmbedder, captions: Any, options: SuiteOptions) -> protocols.Scores:
    return protocols.evaluate_t2i(embedder, captions)


COLUMNS: tuple[Column, ...] = (
    Column("i2i_gpr1200", "GPR1200", "i2i", ("gpr1200",), "map", _i2i("gpr1200", "load_gpr1200"), _eval_i2i),
    Column("i2i_instre", "INSTRE", "i2i", ("instre",), "map", _i2i("instre", "load_instre"), _eval_i2i),
    Column("i2i_cub200", "CUB200", "i2i", ("cub200",), "map", _i2i("cub200", "load_cub", "test"), _eval_i2i),
    Column("i2i_roxford5k", "ROxford", "i2i", ("roxford5k",), "medium",
           _i2i("roxford5k", "load_revisited", "roxford5k"), _eval_revisited),
    Column("knn_imagenet", "IN-V", "knn", ("imagenet",), "top1",
           _knn(_IMAGENET_TRAIN, _i2i("imagenet", "load_imagenet", "val")), _eval_knn),
    Column("knn_imagenet_sketch", "IN-S", "knn", ("imagenet", "imagenet_sketch"), "top1",
           _knn(_IMAGENET_TRAIN, _i2i("imagenet_sketch", "load_imagenet_sketch")), _eval_knn),
    Column("knn_imagenet_a", "IN-A", "knn", ("imagenet", "imagenet_a"), "top1",
           _knn(_IMAGENET_TRAIN, _i2i("imagenet_a", "load_imagenet_a")), _eval_knn),
    Column("knn_aircraft", "FGVCA", "knn", ("aircraft",), "top1",
           _knn(_i2i("aircraft", "load_aircraft", "trainval"), _i2i("aircraft", "load_aircraft", "test")), _eval_knn),
    Column("zs_imagenet", "IN-V", "zs", ("imagenet",), "top1", _i2i("imagenet", "load_imagenet", "val"),
           _eval_zero_shot),
    Column("zs_imagenet_sketch", "IN-S", "zs", ("imagenet_sketch",), "top1",
           _i2i("imagenet_sketch", "load_imagenet_sketch"), _eval_zero_shot),
    Column("zs_imagenet_a", "IN-A", "zs", ("imagenet_a",), "top1", _i2i("imagenet_a", "load_imagenet_a"),
           _eval_zero_shot_imagenet_a),
    Column("zs_objectnet", "ON", "zs", ("objectnet",), "top1", _i2i("objectnet", "load_objectnet"), _eval_zero_shot),
    Column("t2i_flickr30k", "Flickr30k", "t2i", ("flickr30k",), "r5",
           _i2i("flickr30k", "load_karpathy", "flickr30k", "test"), _eval_t2i),
    Column("t2i_coco", "MS-COCO", "t2i", ("coco",), "r5", _i2i("coco", "load_karpathy", "coco", "test"), _eval_t2i),
)
COLUMN_NAMES: tuple[str, ...] = tuple(column.name for column in COLUMNS)


def get_column(name: str) -> Column:
    """The column called ``name``; the error lists the known ones."""
    for column in COLUMNS:
        if column.name == name:
            return column
    raise ValueError(f"unknown benchmark column {name!r}; known: {', '.join(COLUMN_NAMES)}")


def select_columns(names: Sequence[str] | None) -> tuple[Column, ...]:
    """The columns called ``names`` in Table 1 order (all 14 for ``None`` or empty)."""
    if not names:
        return COLUMNS
    wanted = {get_column(name).name for name in names}
    return tuple(column for column in COLUMNS if column.name in wanted)


def parse_roots(raw: Any, base: Path | None = None) -> dict[str, str]:
    """Validate a roots mapping ``{key: folder}`` (keys of :data:`ROOTS`); empty values mean "not set".

    A top-level ``roots:`` key is accepted. Relative local folders are taken relative to ``base``
    (the roots file's folder); URLs (``s3://…``) are kept as they are.
    """
    if isinstance(raw, Mapping) and set(raw) == {"roots"}:
        raw = raw["roots"]
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"roots must be a mapping of benchmark key to folder, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(ROOTS))
    if unknown:
        raise ValueError(f"unknown benchmark root(s) {', '.join(unknown)}; known: {', '.join(ROOTS)}")
    roots = {}
    for key, value in raw.items():
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise ValueError(f"roots.{key} must be a folder path or URL, got {value!r}")
        if "://" in value:
            roots[str(key)] = value
            continue
        path = Path(value).expanduser()
        roots[str(key)] = str(base / path if base is not None and not path.is_absolute() else path)
    return roots


def read_roots(path: str | Path) -> dict[str, str]:
    """Roots from a YAML file (see :func:`parse_roots`); a missing file is an error naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"roots file {path} does not exist; write one mapping benchmark keys "
                                f"({', '.join(ROOTS)}) to folders")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"roots file {path} is not valid YAML: {exc}") from exc
    return parse_roots(raw, path.parent.resolve())
