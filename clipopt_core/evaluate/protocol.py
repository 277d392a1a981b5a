"""Evaluate one model on a test split with the paper's protocol (docs/method.md#evaluation).

The split is a manifest frame (``uri``, ``label``, ``category``, ``caption``, ``source``):

* image→image mAP (query counted as a hit, GPR1200) and R@1 (query excluded) over ``label``;
* k-NN top-1 (k=21, weight exp(sim/0.1)) over ``category``;
* zero-shot top-1 over the split's ``label`` names with a prompt-template set;
* text→image R@1/5/10 with each distinct ``caption`` as a query, relevant to every image
  carrying that caption;
* group means (I2I, kNN, ZS, T2I) and the overall mean; per-source I2I mAP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import polars as pl
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipopt_core.evaluate import metrics
from clipopt_core.data.datasets import encode_labels
from clipopt_core.models.encode import embed_images, embed_texts, zero_shot_classifier
from clipopt_core.models.loading import ClipBundle

OPENAI_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
METRIC_COLUMNS = ("i2i_map", "i2i_r1", "knn_top1", "zs_top1", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass(frozen=True)
class EvalConfig:
    """``templates``: zero-shot prompts with ``{}`` for the class name (default: OpenAI's 80)."""

    templates: tuple[str, ...] = OPENAI_TEMPLATES
    knn_k: int = 21
    knn_temperature: float = 0.1
    batch_size: int = 64
    per_source: bool = True


@dataclass
class EvalResult:
    metrics: dict[str, float]
    image_embeddings: torch.Tensor  # [N, D] normalised, rows in split order
    per_source: dict[str, float] = field(default_factory=dict)


def evaluate_model(bundle: ClipBundle, split: pl.DataFrame, config: EvalConfig = EvalConfig(), *,
                   device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """All metrics of ``bundle`` on ``split`` (see module docstring); metric values in [0, 1]."""
    if split.height == 0:
        raise ValueError("the evaluation split is empty; lower test_fraction's granularity or add classes")
    images = embed_images(bundle, split["uri"].to_list(), batch_size=config.batch_size, device=device, progress=progress)
    label_ids, class_names = encode_labels(split["label"].to_list())
    labels = torch.tensor(label_ids)
    results = {
        "i2i_map": metrics.image_to_image_map(images, labels, include_query=True),
        "i2i_r1": metrics.image_to_image_recall_at_1(images, labels),
        "knn_top1": metrics.knn_accuracy(images, _ids(split["category"].to_list()), k=config.knn_k,
                                         temperature=config.knn_temperature),
    }
    classifier = zero_shot_classifier(bundle, class_names, config.templates, device=device)
    results["zs_top1"] = metrics.zero_shot_accuracy(images, classifier, labels)
    results.update(_text_to_image(bundle, images, split["caption"].to_list(), device))
    results.update(metrics.group_means(results))
    by_source = {}
    if config.per_source and split["source"].n_unique() > 1:
        by_source = metrics.map_by_query_source(images, labels, split["source"].to_list())
    return EvalResult(results, images, by_source)


def validation_map(split: pl.DataFrame, *, batch_size: int = 64, device: str | torch.device = "cpu") -> Callable[[ClipBundle], float]:
    """A validation function for retrieval stages: I2I mAP of the model on ``split``."""
    labels = _ids(split["label"].to_list())
    uris = split["uri"].to_list()

    def _score(bundle: ClipBundle) -> float:
        return metrics.image_to_image_map(embed_images(bundle, uris, batch_size=batch_size, device=device), labels)

    return _score


def validation_t2i(image_embeddings: torch.Tensor, captions: Sequence[str | None], *,
                   device: str | torch.device = "cpu") -> Callable[[ClipBundle], float]:
    """A validation function for realignment: mean T2I R@1/5/10 against frozen ``image_embeddings`` [N, D]."""

    def _score(bundle: ClipBundle) -> float:
        recalls = _text_to_image(bundle, image_embeddings, captions, device)
        return sum(recalls.values()) / max(len(recalls), 1)

    return _score


def _text_to_image(bundle: ClipBundle, images: torch.Tensor, captions: Sequence[str | None],
                   device: str | torch.device) -> dict[str, float]:
    texts = sorted({c for c in captions if c})
    if not texts:
        return {}
    lookup = {text: number for number, text in enumerate(texts)}
    image_groups = torch.tensor([lookup.get(c, -1) if c else -1 for c in captions])
    recall = metrics.text_to_image_recall(embed_texts(bundle, texts, device=device), images,
                                          torch.arange(len(texts)), image_groups, ks=(1, 5, 10))
    return {f"t2i_r{k}": value for k, value in recall.items()}


def _ids(values: Sequence[str]) -> torch.Tensor:
    """Class ids [N] (long) of string labels; only equality matters to the metrics."""
    return torch.tensor(encode_labels(values)[0], dtype=torch.long)
