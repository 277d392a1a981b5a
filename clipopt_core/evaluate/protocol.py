"""Evaluate one model with the paper's protocol (docs/method.md#evaluation).

The labelled test split is a manifest frame (``uri``, ``label``, ``category``, ``caption``, ``source``):

* image→image mAP (query counted as a hit, GPR1200) and R@1 (query excluded) over ``label``;
* k-NN top-1 (k=21, weight exp(sim/0.1)) over ``category``;
* zero-shot top-1 over the split's ``label`` names with a prompt-template set;
* ``t2i_cls_r1/5/10`` (secondary): text→image with each distinct ``caption`` of the split as a
  query, relevant to every image carrying that caption (class names for most sources).

The held-out caption pairs (``uri``, ``caption``; the caption corpus's test split) give the
paper's T2I, ``t2i_r1/5/10``: every distinct (normalised) caption is a query whose relevant set
is every image carrying it. Group means (I2I, kNN, ZS, T2I = R@5) and ``avg``; per-source I2I
mAP; and per-query scores for the bootstrap (:data:`QUERY_SETS` says which queries each uses).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import polars as pl
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipopt_core.data.captions import normalise_caption
from clipopt_core.data.datasets import encode_labels
from clipopt_core.evaluate import metrics
from clipopt_core.evaluate.aggregate import group_means, mean_by_group
from clipopt_core.models.encode import embed_images, embed_texts, zero_shot_classifier
from clipopt_core.models.loading import ClipBundle

OPENAI_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
T2I_KS = (1, 5, 10)
METRIC_COLUMNS = ("i2i_map", "i2i_r1", "knn_top1", "zs_top1", *(f"t2i_r{k}" for k in T2I_KS),
                  *(f"t2i_cls_r{k}" for k in T2I_KS))
QUERY_SETS = {"i2i_map": "test_images", "i2i_r1": "test_images", "knn_top1": "test_images", "zs_top1": "test_images",
              **{f"t2i_r{k}": "caption_queries" for k in T2I_KS},
              **{f"t2i_cls_r{k}": "class_caption_queries" for k in T2I_KS}}


@dataclass(frozen=True)
class EvalConfig:
    """``templates``: zero-shot prompts with ``{}`` for the class name (default: OpenAI's 80).
    ``gallery_queries``: held-out captions whose top-5 images are kept for the text→image gallery.
    ``image_gallery_queries``: test images whose top-5 neighbours are kept for the image→image gallery.
    ``max_image_queries``: ``None`` (default) makes every test image a query of I2I mAP, R@1 and kNN;
    a number draws that many query images, seeded by ``query_seed`` (:func:`query_sample`), each still
    ranked against the whole test split -- for very large test sets (docs/method.md, "Evaluation").
    ``class_chunk``: classes whose prompts are embedded at once for zero-shot (memory ∝ chunk × templates).
    ``embedding_cache_bytes``: what the :class:`EmbeddingCache` of several variants may hold, bytes."""

    templates: tuple[str, ...] = OPENAI_TEMPLATES
    knn_k: int = 21
    knn_temperature: float = 0.1
    batch_size: int = 64
    per_source: bool = True
    gallery_queries: int = 4
    image_gallery_queries: int = 3
    max_image_queries: int | None = None
    query_seed: int = 0
    class_chunk: int = 256
    embedding_cache_bytes: int = 2 << 30


@dataclass(frozen=True)
class CaptionBenchmark:
    """Held-out text→image queries: ``texts [T]`` (one per normalised caption), ``uris [M]`` (distinct
    images), ``relevant[t]``: indices into ``uris`` of the images carrying caption ``t``."""

    texts: list[str]
    uris: list[str]
    relevant: list[list[int]]


@dataclass(frozen=True)
class T2IExample:
    """One gallery row: a caption, its top-k image URIs and whether each is relevant."""

    query: str
    uris: list[str]
    relevant: list[bool]


@dataclass
class EvalResult:
    """``image_embeddings``: [N, D] normalised test embeddings in split order, or ``None`` once released
    (:func:`clipopt_core.evaluate.variants.evaluate_variants` keeps only ``i2i_examples`` per variant).
    ``i2i_examples``: query row → its top-5 neighbour rows (query excluded), for the image→image gallery."""

    metrics: dict[str, float]
    image_embeddings: torch.Tensor | None
    per_source: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [Q] float64, nan = skipped
    t2i_examples: list[T2IExample] = field(default_factory=list)
    i2i_examples: dict[int, list[int]] = field(default_factory=dict)


class EmbeddingCache:
    """Embeddings reused across variants whose tower weights are identical (``stage1`` and ``2sft`` share
    the image tower; ``baseline``, ``stage1`` and ``mcip`` the text tower). Keyed by a hash of the tower's
    parameters and what was embedded; holds CPU tensors of at most ``max_bytes`` together (least recently
    used first out; one entry larger than that is returned but not kept), so memory does not grow with
    the number of variants."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def get(self, key: tuple[str, str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        value = compute()
        self._store[key] = value
        while self.max_bytes is not None and self._store and self.nbytes > self.max_bytes:
            self._store.popitem(last=False)
        return value


def tower_fingerprints(bundle: ClipBundle) -> tuple[str, str]:
    """``(image tower, text tower)`` hashes of the parameters and buffers (image: ``visual.*`` plus the
    preprocessing; text: everything else, so a realigned text tower hashes differently)."""
    image, text = hashlib.sha256(), hashlib.sha256()
    image.update(repr((bundle.image_size, bundle.mean, bundle.std, bundle.interpolation)).encode())
    for name, tensor in sorted(bundle.model.state_dict().items()):
        target = image if name.startswith("visual.") else text
        target.update(name.encode())
        target.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return image.hexdigest()[:24], text.hexdigest()[:24]


def caption_benchmark(pairs: pl.DataFrame) -> CaptionBenchmark:
    """The queries of ``pairs`` (``uri``, ``caption``): one per normalised caption (first spelling kept)."""
    uri_index: dict[str, int] = {}
    texts: dict[str, str] = {}
    relevant: dict[str, set[int]] = {}
    for uri, caption in pairs.select("uri", "caption").iter_rows():
        if not caption or not str(caption).strip():
            continue
        key = normalise_caption(caption)
        texts.setdefault(key, " ".join(str(caption).split()))
        relevant.setdefault(key, set()).add(uri_index.setdefault(uri, len(uri_index)))
    return CaptionBenchmark(list(texts.values()), list(uri_index), [sorted(relevant[k]) for k in texts])


def evaluate_model(bundle: ClipBundle, split: pl.DataFrame, config: EvalConfig = EvalConfig(), *,
                   caption_pairs: pl.DataFrame | None = None, cache: EmbeddingCache | None = None,
                   device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """All metrics of ``bundle`` on ``split`` and the held-out ``caption_pairs`` (module docstring); values in [0, 1].

    Without ``caption_pairs`` (or with none left) the held-out T2I columns are ``nan``. ``cache``
    shares embeddings between variants with identical towers.
    """
    if split.height == 0:
        raise ValueError("the evaluation split is empty; lower test_fraction's granularity or add classes")
    cache = cache or EmbeddingCache()
    image_tower, text_tower = tower_fingerprints(bundle)

    def images_of(uris: list[str], what: str) -> torch.Tensor:
        return cache.get((image_tower, what), lambda: embed_images(bundle, uris, batch_size=config.batch_size,
                                                                  device=device, progress=progress))

    def texts_of(texts: list[str], what: str) -> torch.Tensor:
        return cache.get((text_tower, what), lambda: embed_texts(bundle, texts, device=device))

    images = images_of(split["uri"].to_list(), "test_images:" + _digest(split["uri"].to_list()))
    label_ids, class_names = encode_labels(split["label"].to_list())
    labels = torch.tensor(label_ids)
    queries = query_sample(split.height, config.max_image_queries, config.query_seed)
    per_query = {
        "i2i_map": metrics.image_to_image_ap(images, labels, include_query=True, queries=queries),
        "i2i_r1": metrics.image_to_image_hits_at_1(images, labels, queries=queries),
        "knn_top1": metrics.knn_correct_per_query(images, _ids(split["category"].to_list()), k=config.knn_k,
                                                  temperature=config.knn_temperature, queries=queries),
    }
    classifier = cache.get((text_tower, "zs:" + _digest([*class_names, *config.templates])),
                           lambda: class_embeddings(bundle, class_names, config.templates, chunk=config.class_chunk,
                                                    device=device))
    per_query["zs_top1"] = metrics.zero_shot_correct_per_query(images, classifier, labels)
    class_texts, class_groups, image_groups = _class_caption_queries(split["caption"].to_list())
    class_hits = metrics.text_to_image_hits(texts_of(class_texts, "cls:" + _digest(class_texts)), images,
                                            class_groups, image_groups, ks=T2I_KS)
    per_query.update({f"t2i_cls_r{k}": hits for k, hits in class_hits.items()})
    benchmark = caption_benchmark(caption_pairs if caption_pairs is not None else pl.DataFrame(
        schema={"uri": pl.String, "caption": pl.String}))
    pair_images = images_of(benchmark.uris, "pairs:" + _digest(benchmark.uris))
    pair_texts = texts_of(benchmark.texts, "pairs:" + _digest(benchmark.texts))
    hits = metrics.caption_hits(pair_texts, pair_images, benchmark.relevant, ks=T2I_KS)
    per_query.update({f"t2i_r{k}": h for k, h in hits.items()})
    scores = {name: values.cpu().numpy() for name, values in per_query.items()}
    results = {name: metrics.mean_of_scores(values) for name, values in per_query.items()}
    results.update(group_means(results))
    by_source = {}
    if config.per_source and split["source"].n_unique() > 1:
        by_source = mean_by_group(per_query["i2i_map"], split["source"].to_list())  # the same APs
    examples = _t2i_examples(benchmark, pair_texts, pair_images, config.gallery_queries)
    rows = gallery_rows(split.height, config.image_gallery_queries)
    neighbours = metrics.nearest_neighbours(images, torch.tensor(rows, dtype=torch.long), 5).tolist()
    return EvalResult(results, images, by_source, scores, examples, dict(zip(rows, neighbours)))


def query_sample(n: int, count: int | None, seed: int) -> torch.Tensor | None:
    """``count`` query rows of ``n`` drawn without replacement by a generator seeded with ``seed``, ascending
    ([count] int64); ``None`` (every row a query) when ``count`` is ``None`` or not below ``n``."""
    if count is None or count >= n:
        return None
    if count < 1:
        raise ValueError(f"max_image_queries must be >= 1 or None (every image), got {count}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def gallery_rows(n: int, count: int) -> list[int]:
    """``count`` evenly spaced rows of ``n`` (first and last included): the image→image gallery's queries."""
    return sorted(set(np.linspace(0, n - 1, num=min(count, n)).astype(int).tolist())) if n and count > 0 else []


def class_embeddings(bundle: ClipBundle, class_names: Sequence[str], templates: Sequence[str], *, chunk: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Zero-shot class embeddings [C, D] (:func:`~clipopt_core.models.encode.zero_shot_classifier`), ``chunk``
    classes at a time, so at most ``chunk × len(templates)`` prompt embeddings are held at once."""
    if chunk < 1:
        raise ValueError(f"class_chunk must be >= 1, got {chunk}")
    parts = [zero_shot_classifier(bundle, class_names[start:start + chunk], templates, device=device)
             for start in range(0, len(class_names), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def validation_subset(split: pl.DataFrame, max_images: int | None, seed: int = 0, *, by: str = "label") -> pl.DataFrame:
    """The validation rows scored during training: the whole ``split`` when it has at most ``max_images`` rows
    (or ``max_images`` is ``None``), else whole groups of ``by`` (classes; images for caption pairs) in a
    seeded order until ``max_images`` rows are filled (a group that does not fit is passed over), in split
    order. Whole classes keep every kept query's relevant set complete, so the subset's mAP is an ordinary
    mAP of a smaller test set; whole images keep every caption of a kept image."""
    if max_images is None or split.height <= max_images:
        return split
    if max_images < 1:
        raise ValueError(f"the validation budget (val_max_images, val_max_pairs) must be >= 1 or None "
                         f"(the whole split), got {max_images}")
    sizes = split.group_by(by).len().sort(by)
    order = torch.randperm(sizes.height, generator=torch.Generator().manual_seed(seed)).tolist()
    kept, total = [], 0
    for group, size in (sizes.row(i) for i in order):
        if total + size <= max_images:
            kept.append(group)
            total += size
    if not kept:  # every group is larger than the budget: the first group of the order, cut to the budget
        return split.filter(pl.col(by) == sizes[by][order[0]]).head(max_images)
    return split.filter(pl.col(by).is_in(kept))


def validation_map(split: pl.DataFrame, *, batch_size: int = 64, device: str | torch.device = "cpu",
                   max_images: int | None = None, seed: int = 0) -> Callable[[ClipBundle], float]:
    """A validation function for retrieval stages: I2I mAP of the model on ``split``, or on its bounded,
    fixed subset :func:`validation_subset` (``max_images``, ``seed``): the same images at every evaluation."""
    split = validation_subset(split, max_images, seed)
    labels = _ids(split["label"].to_list())
    uris = split["uri"].to_list()

    def _score(bundle: ClipBundle) -> float:
        return metrics.image_to_image_map(embed_images(bundle, uris, batch_size=batch_size, device=device), labels)

    return _score


def validation_caption_t2i(image_embeddings: torch.Tensor, benchmark: CaptionBenchmark, *,
                           device: str | torch.device = "cpu") -> Callable[[ClipBundle], float]:
    """A validation function for realignment on caption pairs (e.g. ``caption_benchmark(realign_validation_pairs(...))``):
    mean T2I R@1/5/10 against frozen ``image_embeddings`` [M, D] of ``benchmark.uris``."""

    def _score(bundle: ClipBundle) -> float:
        hits = metrics.caption_hits(embed_texts(bundle, benchmark.texts, device=device), image_embeddings,
                                    benchmark.relevant, ks=T2I_KS)
        return _mean_recall(hits)

    return _score


def _mean_recall(hits: dict[int, torch.Tensor]) -> float:
    recalls = [metrics.mean_of_scores(h) for h in hits.values()]
    recalls = [r for r in recalls if r == r]
    return sum(recalls) / len(recalls) if recalls else 0.0


def _class_caption_queries(captions: Sequence[str | None]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Distinct captions of a labelled split as queries: ``(texts, text groups [T], image groups [N])``."""
    texts = sorted({c for c in captions if c})
    lookup = {text: number for number, text in enumerate(texts)}
    image_groups = torch.tensor([lookup.get(c, -1) if c else -1 for c in captions], dtype=torch.long)
    return texts, torch.arange(len(texts)), image_groups


def _t2i_examples(benchmark: CaptionBenchmark, texts: torch.Tensor, images: torch.Tensor, count: int,
                  top_k: int = 5) -> list[T2IExample]:
    """Top-``top_k`` images of ``count`` evenly spaced held-out captions (the same queries for every variant)."""
    if not benchmark.texts or not benchmark.uris or count < 1:
        return []
    rows = np.unique(np.linspace(0, len(benchmark.texts) - 1, num=min(count, len(benchmark.texts))).astype(int))
    out = []
    for row in rows.tolist():
        order = torch.sort(images @ texts[row], descending=True, stable=True).indices[:top_k].tolist()
        relevant = set(benchmark.relevant[row])
        out.append(T2IExample(benchmark.texts[row], [benchmark.uris[i] for i in order], [i in relevant for i in order]))
    return out


def _digest(values: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(values).encode()).hexdigest()[:16]


def _ids(values: Sequence[str]) -> torch.Tensor:
    """Class ids [N] (long) of string labels; only equality matters to the metrics."""
    return torch.tensor(encode_labels(values)[0], dtype=torch.long)
