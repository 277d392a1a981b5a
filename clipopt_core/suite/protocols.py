"""The paper's protocols for the Table 1 benchmarks, on L2-normalised embeddings (cosine = dot product).

The protocols of docs/method.md#benchmark-suite:

* **I2I mAP** (GPR1200, INSTRE, CUB-200): every image a query against the whole set, the query itself
  counted as a hit (:func:`clipopt_core.evaluate.metrics.image_to_image_map`, ``include_query=True``).
* **Revisited Oxford/Paris**: mAP for the easy, medium and hard protocols with junk images removed from
  the ranking, exactly as ``compute_map`` of revisitop (Radenović et al. 2018) does, including its
  trapezoidal AP; queries uncropped, as the paper used them.
* **kNN top-1**: each test image's k = 21 nearest images of a *separate* database (the benchmark's train
  split) vote with weight exp(sim / 0.1).
* **Zero-shot top-1**: class embeddings are the renormalised mean of the prompt embeddings over the
  templates (OpenAI's 80 by default), optionally restricted to a class subset (ImageNet-A's 200).
* **T2I Recall@1/5/10** (Karpathy Flickr30k/COCO test): each caption retrieves its own image among all
  test images (5 captions per image); the paper's column is R@5.

The ``*_correct``/``*_ap`` functions take tensors and return per-query ``[Q]`` float64 scores (``nan`` =
skipped); the ``evaluate_*`` functions embed a loaded benchmark with a :class:`SuiteEmbedder` and return
those per-query scores by metric (:data:`Scores`), so the paired bootstrap can resample them
(docs/method.md#benchmark-suite); :func:`point_values` turns them into the column values (their means).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from clipopt_core.evaluate import metrics
from clipopt_core.evaluate.protocol import OPENAI_TEMPLATES
from clipopt_core.suite.embedding import SuiteEmbedder
from clipopt_core.suite.types import CaptionSet, ImageSet, RevisitedSet

REVISITED_PROTOCOLS = ("easy", "medium", "hard")
T2I_KS = (1, 5, 10)
Scores = dict[str, np.ndarray]  # metric -> [Q] float64 per-query scores (AP or 1/0 hit), nan = query skipped


def point_values(scores: Scores) -> dict[str, float]:
    """``{metric: value in [0, 1]}``: the mean of each metric's non-``nan`` per-query scores (``nan`` if none)."""
    return {name: metrics.mean_of_scores(torch.from_numpy(np.array(values, dtype=np.float64)))
            for name, values in scores.items()}


def _numpy(scores: Tensor) -> np.ndarray:
    return scores.detach().cpu().double().numpy()


def revisited_ground_truth(revisited: RevisitedSet, protocol: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(positives, junk)`` per query for ``protocol`` (revisitop's ``example_evaluate.py``):

    easy: positives easy, junk hard + junk; medium: positives easy + hard, junk junk;
    hard: positives hard, junk easy + junk.
    """
    if protocol not in REVISITED_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(REVISITED_PROTOCOLS)}, got {protocol!r}")
    e, h, j = revisited.easy, revisited.hard, revisited.junk
    if protocol == "easy":
        return list(e), [np.concatenate([a, b]) for a, b in zip(h, j)]
    if protocol == "medium":
        return [np.concatenate([a, b]) for a, b in zip(e, h)], list(j)
    return list(h), [np.concatenate([a, b]) for a, b in zip(e, j)]


def revisited_ap(queries: Tensor, database: Tensor, positives: Sequence[np.ndarray], junk: Sequence[np.ndarray], *,
                 chunk_size: int = 256) -> Tensor:
    """AP per query, revisitop ``compute_map``: ``queries [Q, D]``, ``database [N, D]``; ``positives[q]``,
    ``junk[q]`` database indices. Returns ``[Q]`` float64, ``nan`` for a query without positives.

    The database is ranked by similarity, descending (ties: smaller index first). Each positive's rank
    is lowered by the junk images ranked before it (junk is removed from the ranking), then
    AP = Σ_j ((j / r_j, or 1 when r_j = 0) + (j + 1) / (r_j + 1)) / 2 / |positives| over the positives'
    0-based ranks r_j, j = 0, 1, … (trapezoids under the precision–recall curve).
    """
    if len(positives) != queries.shape[0] or len(junk) != queries.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but ground truth for {len(positives)} / {len(junk)}")
    q = queries.float()
    db = database.to(q.device).float()
    ap = torch.full((q.shape[0],), float("nan"), dtype=torch.float64)
    for start in range(0, q.shape[0], chunk_size):
        order = torch.sort(q[start:start + chunk_size] @ db.T, dim=1, descending=True, stable=True).indices
        rank_of = torch.empty_like(order).scatter_(1, order, torch.arange(db.shape[0], device=q.device).expand_as(order))
        rank_of = rank_of.cpu().numpy()
        for row in range(order.shape[0]):
            index = start + row
            ok = np.asarray(positives[index], dtype=np.int64)
            if ok.size == 0:
                continue
            pos = np.sort(rank_of[row, np.unique(ok)])
            bad = np.sort(rank_of[row, np.unique(np.asarray(junk[index], dtype=np.int64))])
            pos = pos - np.searchsorted(bad, pos, side="left")  # junk ranked strictly before each positive
            ap[index] = trapezoid_ap(pos, ok.size)
    return ap


def trapezoid_ap(ranks: np.ndarray, positives: int) -> float:
    """revisitop ``compute_ap``: AP of sorted 0-based ``ranks`` of the positives found, ``positives`` in all."""
    j = np.arange(len(ranks), dtype=np.float64)
    r = ranks.astype(np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    after = (j + 1) / (r + 1)
    return float(((before + after) / 2.0).sum() / positives)


def knn_correct(queries: Tensor, query_labels: Tensor, database: Tensor, database_labels: Tensor, *, k: int = 21,
                temperature: float = 0.1, chunk_size: int = 256) -> Tensor:
    """Weighted kNN top-1 of ``queries [Q, D]`` against a separate ``database [N, D]``: ``[Q]`` float64 1/0.

    The ``min(k, N)`` most similar database images vote for their label with weight
    ``exp(sim / temperature)``; the largest summed weight wins (ties: smallest label). Labels are
    integer class ids shared by both sides (``query_labels [Q]``, ``database_labels [N]``). Which of
    several equally similar images at the k-th place is kept is ``torch.topk``'s choice. The largest
    temporary is the ``[chunk_size, N]`` float32 similarity block (1.3 GB for ImageNet train at 256).
    """
    if temperature <= 0 or k < 1 or chunk_size < 1:
        raise ValueError(f"need temperature > 0, k >= 1 and chunk_size >= 1; got {temperature}, {k}, {chunk_size}")
    if database.shape[0] == 0:
        raise ValueError("the kNN database is empty")
    db = database.float()
    q = queries.to(db.device).float()
    db_labels = torch.as_tensor(database_labels, dtype=torch.long).to(db.device)
    q_labels = torch.as_tensor(query_labels, dtype=torch.long).to(db.device)
    classes = int(max(db_labels.max(), q_labels.max() if q_labels.numel() else 0)) + 1
    k = min(k, db.shape[0])
    correct = torch.empty(q.shape[0], dtype=torch.float64)
    for start in range(0, q.shape[0], chunk_size):
        sims, index = (q[start:start + chunk_size] @ db.T).topk(k, dim=1)
        weights = torch.exp((sims.double() - sims[:, :1].double()) / temperature)  # row max out: same argmax
        votes = torch.zeros(sims.shape[0], classes, dtype=torch.float64, device=db.device)
        votes.scatter_add_(1, db_labels[index], weights)
        correct[start:start + sims.shape[0]] = (votes.argmax(dim=1) == q_labels[start:start + chunk_size]).double().cpu()
    return correct


def zero_shot_correct(images: Tensor, classifier: Tensor, labels: Tensor, classes: Sequence[int] | None = None) -> Tensor:
    """Zero-shot top-1 per image: ``images [N, D]``, ``classifier [C, D]``, ``labels [N]`` ids in ``[0, C)``.

    ``classes``: the class ids predictions are restricted to (ImageNet-A's 200 of the 1000); every label
    must be one of them. Returns ``[N]`` float64 1/0.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if classes is None:
        return metrics.zero_shot_correct_per_query(images, classifier, labels)
    subset = torch.as_tensor(list(classes), dtype=torch.long)
    position = torch.full((classifier.shape[0],), -1, dtype=torch.long)
    position[subset] = torch.arange(len(subset))
    if bool((position[labels] < 0).any()):
        raise ValueError("every label must be one of the zero-shot class subset")
    return metrics.zero_shot_correct_per_query(images, classifier[subset], position[labels])


def evaluate_i2i(embedder: SuiteEmbedder, images: ImageSet) -> Scores:
    """``{"map": [N] AP}``: every image a query against the whole set, the query counted as a hit (GPR1200)."""
    embeddings = embedder.images(images.uris, images.crops)
    return {"map": _numpy(metrics.image_to_image_ap(embeddings, torch.from_numpy(images.labels), include_query=True))}


def evaluate_revisited(embedder: SuiteEmbedder, revisited: RevisitedSet) -> Scores:
    """``{"easy", "medium", "hard": [Q] AP}`` of uncropped queries against the database (junk excluded;
    ``nan`` for a query without positives in that protocol)."""
    database, queries = embedder.images(revisited.database), embedder.images(revisited.queries)
    return {protocol: _numpy(revisited_ap(queries, database, *revisited_ground_truth(revisited, protocol)))
            for protocol in REVISITED_PROTOCOLS}


def evaluate_knn(embedder: SuiteEmbedder, database: ImageSet, queries: ImageSet, *, k: int = 21,
                 temperature: float = 0.1) -> Scores:
    """``{"top1": [Q] 1/0}``: kNN correctness of ``queries`` against ``database`` (labels in one id space)."""
    db = embedder.images(database.uris, database.crops)
    q = embedder.images(queries.uris, queries.crops)
    device = embedder.device
    correct = knn_correct(q.to(device), torch.from_numpy(queries.labels), db.to(device), torch.from_numpy(database.labels),
                          k=k, temperature=temperature)
    return {"top1": _numpy(correct)}


def evaluate_zero_shot(embedder: SuiteEmbedder, images: ImageSet, *, templates: Sequence[str] = OPENAI_TEMPLATES,
                       classes: Sequence[int] | None = None) -> Scores:
    """``{"top1": [N] 1/0}``: zero-shot correctness over ``images.class_names`` (or the ``classes`` subset)."""
    classifier = embedder.classifier(images.class_names, templates)
    embeddings = embedder.images(images.uris, images.crops)
    return {"top1": _numpy(zero_shot_correct(embeddings, classifier, torch.from_numpy(images.labels), classes))}


def evaluate_t2i(embedder: SuiteEmbedder, captions: CaptionSet, ks: Sequence[int] = T2I_KS) -> Scores:
    """``{"r1", "r5", "r10": [T] 1/0}``: whether each caption finds its image among all test images in the top K."""
    images, texts = embedder.images(captions.images), embedder.texts(captions.captions)
    hits = metrics.text_to_image_hits(texts, images, torch.from_numpy(captions.caption_image),
                                      torch.arange(len(captions.images)), ks=ks)
    return {f"r{k}": _numpy(values) for k, values in hits.items()}
