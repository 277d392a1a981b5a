"""Retrieval / classification metrics on L2-normalised embeddings (cosine = dot product).

All functions take torch tensors and compute on the tensors' device. Queries are
processed in chunks of ``chunk_size`` rows, so the largest temporary is a
``[chunk_size, N]`` similarity block (never ``[N, N]``). No metric sorts a block: average
precision needs only the ranks of each query's *relevant* items, found by a binary search of every
item among the (few) relevant scores of its row and a count (O(N log P) per query, P = relevant
items), and the top-k metrics use ``torch.topk``. Peak memory is about ``2 * 8 * chunk_size * N``
bytes for mAP (int64 placements; 1.6 GB at N=100k, chunk 1024) and about half that for the others.
Beyond the matrix product itself (N²·D for N queries) nothing grows faster than N·log.

Every image→image metric takes an optional ``queries`` (``[Q]`` row indices): only those rows are
queries, each still ranked against the whole set, and the other rows' scores are ``nan`` -- the
seeded query sample of :class:`clipopt_core.evaluate.protocol.EvalConfig` for very large test sets.

Ranking and ties
----------------
Every ranking is *deterministic*: items are ordered by similarity, descending, and
items with exactly equal similarity are ordered by ascending index (a stable sort of
the original order). Top-k selections (Recall@1, kNN, text→image Recall@K) use the
same rule: among tied candidates at the cut-off, the smallest indices are kept.
Classification argmaxes (kNN votes, zero-shot) break ties towards the smallest class
index (smallest label value for kNN).

Per-query scores
----------------
Each metric is the mean of a per-query score, and each has a ``*_per_query`` (or
``image_to_image_ap``) function returning that score for every query as a ``[Q]`` float64
tensor: AP for mAP, hit (1/0) for Recall@K, correct (1/0) for kNN and zero-shot. Queries a
metric skips are ``nan``. :mod:`clipopt_core.evaluate.bootstrap` resamples these for
confidence intervals (docs/method.md, "Evaluation").
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from clipopt_core.evaluate.aggregate import mean_by_group
from clipopt_core.evaluate.ranks import relevant_items, relevant_ranks

__all__ = [
    "image_to_image_ap",
    "image_to_image_map",
    "image_to_image_recall_at_1",
    "image_to_image_hits_at_1",
    "nearest_neighbours",
    "knn_accuracy",
    "knn_correct_per_query",
    "zero_shot_accuracy",
    "zero_shot_correct_per_query",
    "text_to_image_recall",
    "text_to_image_hits",
    "caption_hits",
    "mean_of_scores",
    "map_by_query_source",
]

ZERO_SHOT_BLOCK_SCORES = 1 << 26  # zero-shot scores images in [rows, C] blocks of at most this many (256 MiB)


def _prep(embeddings: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Validate ``embeddings [N, D]`` (cast to float32) and ``labels [N]`` (int64, same device)."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    x = embeddings.detach()
    if x.dtype != torch.float64:
        x = x.float()
    if labels is None:
        return x, None
    y = torch.as_tensor(labels).detach().to(device=x.device, dtype=torch.long).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries but embeddings has {x.shape[0]} rows")
    return x, y


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _similarities_without_self(x: Tensor, rows: Tensor, chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(query rows [B], sims [B, N])`` chunks of ``x[rows] @ x.T`` with each query's own column at -inf."""
    for part in rows.split(chunk_size):
        sims = x[part] @ x.T
        sims[torch.arange(part.numel(), device=x.device), part] = float("-inf")
        yield part, sims


def _query_rows(queries: Tensor | None, n: int, device: torch.device) -> Tensor:
    """Validated ``[Q]`` int64 query row indices (all ``n`` rows when ``queries`` is ``None``)."""
    if queries is None:
        return torch.arange(n, device=device)
    rows = torch.as_tensor(queries, dtype=torch.long).reshape(-1).to(device)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"queries must be row indices in [0, {n}), got {int(rows.min())}..{int(rows.max())}")
    return rows


def _stable_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` per row of ``sims [B, N]`` with ties broken by the smallest column index.

    Returns ``(values [B, k], indices [B, k])`` ordered by (similarity desc, index asc).
    ``torch.topk`` does not specify which of several tied elements it keeps, so rows where a
    tie straddles the k-th place are re-selected deterministically; all rows are then put in
    canonical order.
    """
    vals, idx = sims.topk(k, dim=1)
    kth = vals[:, -1:]
    eq = sims == kth
    straddle = (eq.sum(dim=1) != (vals == kth).sum(dim=1)).nonzero()[:, 0]
    if straddle.numel():
        sub, eq_sub = sims[straddle], eq[straddle]
        need = k - (sub > kth[straddle]).sum(dim=1, keepdim=True)
        take = (sub > kth[straddle]) | (eq_sub & (eq_sub.cumsum(dim=1) <= need))
        idx[straddle] = take.nonzero()[:, 1].view(-1, k)  # row-major: ascending column per row
    idx = idx.sort(dim=1).values  # ascending index, then a stable sort by value
    vals = sims.gather(1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


def mean_of_scores(scores: Tensor) -> float:
    """Mean of the non-``nan`` entries of a per-query score vector ``[Q]``; ``nan`` if none."""
    kept = scores[~torch.isnan(scores)]
    return float(kept.mean()) if kept.numel() else float("nan")


def image_to_image_ap(
    embeddings: Tensor, labels: Tensor, *, include_query: bool = True, chunk_size: int = 1024,
    queries: Tensor | None = None,
) -> Tensor:
    """Average precision of every query (see :func:`image_to_image_map`): ``[N]`` float64, ``nan`` where skipped.

    ``queries``: optional ``[Q]`` row indices; only those rows are queries (each still ranks the whole
    set) and every other entry is ``nan`` -- a query sample for very large test sets.
    """
    _check_chunk(chunk_size)
    x, y = _prep(embeddings, labels)
    n = x.shape[0]
    _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    n_rel = counts[inv] - (0 if include_query else 1)
    ap = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    for part in _query_rows(queries, n, x.device).split(chunk_size):
        sims = x[part] @ x.T
        if not include_query:  # self goes last and is not relevant
            sims[torch.arange(part.numel(), device=x.device), part] = float("-inf")
        r, c = relevant_items(inv, part, include_query=include_query)
        rank = relevant_ranks(sims, r, c)
        del sims
        order = (r * (n + 1) + rank).argsort()  # each row's relevant items in rank order
        r, rank = r[order], rank[order]
        per_row = torch.bincount(r, minlength=part.numel())
        hits = torch.arange(r.numel(), device=x.device) - (per_row.cumsum(0) - per_row)[r] + 1  # relevant seen so far
        ap_sum = torch.zeros(part.numel(), dtype=torch.float64, device=x.device).index_add_(
            0, r, hits.double() / rank.double())
        nr = n_rel[part]
        ap[part] = torch.where(nr > 0, ap_sum / nr.clamp(min=1).double(), float("nan"))
    return ap


def image_to_image_map(
    embeddings: Tensor, labels: Tensor, *, include_query: bool = True, chunk_size: int = 1024,
    queries: Tensor | None = None,
) -> float:
    """Mean average precision with every image a query against the whole set.

    Args:
        embeddings: ``[N, D]`` L2-normalised embeddings.
        labels: ``[N]`` integer class labels; same label = relevant.
        include_query: GPR1200 protocol (default): the query stays in the ranking at its own
            (tie-rule) position and counts as relevant. ``False`` removes it from the ranking.
        chunk_size: number of queries per ``[chunk_size, N]`` similarity block.
        queries: optional ``[Q]`` row indices that are queries (default: every row).

    AP = mean over relevant positions r of precision@r. Queries without any relevant item
    (singleton classes when ``include_query=False``) are skipped; ``nan`` if none remain.
    """
    return mean_of_scores(image_to_image_ap(embeddings, labels, include_query=include_query, chunk_size=chunk_size,
                                            queries=queries))


def nearest_neighbours(embeddings: Tensor, queries: Tensor, k: int, *, chunk_size: int = 1024) -> Tensor:
    """The ``min(k, N-1)`` nearest other rows of each query row: ``[Q, k]`` int64, nearest first.

    ``embeddings [N, D]``, ``queries [Q]`` row indices. Tie rule: the smallest index first.
    """
    _check_chunk(chunk_size)
    x, _ = _prep(embeddings)
    rows = _query_rows(queries, x.shape[0], x.device)
    k_eff = min(k, x.shape[0] - 1)
    if k_eff < 1 or rows.numel() == 0:
        return torch.zeros(rows.numel(), max(k_eff, 0), dtype=torch.long, device=x.device)
    return torch.cat([_stable_topk(sims, k_eff)[1] for _, sims in _similarities_without_self(x, rows, chunk_size)])


def image_to_image_recall_at_1(embeddings: Tensor, labels: Tensor, *, chunk_size: int = 1024,
                               queries: Tensor | None = None) -> float:
    """Recall@1 (query excluded): share of queries whose nearest other image has the same label.

    ``embeddings [N, D]``, ``labels [N]``. Queries of singleton classes are skipped; ``nan``
    if none remain. Ties: the smallest index among equally similar images wins.
    """
    return mean_of_scores(image_to_image_hits_at_1(embeddings, labels, chunk_size=chunk_size, queries=queries))


def image_to_image_hits_at_1(embeddings: Tensor, labels: Tensor, *, chunk_size: int = 1024,
                             queries: Tensor | None = None) -> Tensor:
    """Per-query hit of :func:`image_to_image_recall_at_1`: ``[N]`` float64 1/0, ``nan`` for singleton classes
    and for rows that are not among ``queries`` (``[Q]`` row indices; default every row)."""
    _check_chunk(chunk_size)
    x, y = _prep(embeddings, labels)
    _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    hits = torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device)
    for part, sims in _similarities_without_self(x, _query_rows(queries, x.shape[0], x.device), chunk_size):
        nearest = sims.argmax(dim=1)  # torch.argmax returns the first (smallest-index) maximum
        hits[part] = (inv[nearest] == inv[part]).double()
    hits[counts[inv] <= 1] = float("nan")
    return hits


def knn_accuracy(
    embeddings: Tensor, labels: Tensor, *, k: int = 21, temperature: float = 0.1, chunk_size: int = 1024,
    queries: Tensor | None = None,
) -> float:
    """Leave-one-out weighted k-NN top-1 accuracy.

    ``embeddings [N, D]``, ``labels [N]``. Each query's ``min(k, N-1)`` nearest *other*
    images (tie rule: smallest index) vote for their class with weight ``exp(sim/temperature)``;
    the class with the largest summed weight is predicted, ties going to the smallest label.
    All queries count (a singleton class can never be predicted correctly). ``nan`` if N < 2.
    """
    return mean_of_scores(knn_correct_per_query(embeddings, labels, k=k, temperature=temperature,
                                                chunk_size=chunk_size, queries=queries))


def knn_correct_per_query(
    embeddings: Tensor, labels: Tensor, *, k: int = 21, temperature: float = 0.1, chunk_size: int = 1024,
    queries: Tensor | None = None,
) -> Tensor:
    """Per-query correctness of :func:`knn_accuracy`: ``[N]`` float64 1/0 (all ``nan`` if N < 2), ``nan`` for
    rows not among ``queries`` (``[Q]`` row indices; default every row)."""
    _check_chunk(chunk_size)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x, y = _prep(embeddings, labels)
    n = x.shape[0]
    k_eff = min(k, n - 1)
    correct = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    if k_eff < 1:
        return correct
    _, inv = torch.unique(y, return_inverse=True)  # class index = rank of the sorted label
    n_cls = int(inv.max()) + 1
    for part, sims in _similarities_without_self(x, _query_rows(queries, n, x.device), chunk_size):
        vals, idx = _stable_topk(sims, k_eff)
        vals = vals.double()
        # subtracting the row max rescales all weights of a row equally: argmax unchanged, no overflow
        w = torch.exp((vals - vals[:, :1]) / temperature)
        votes = torch.zeros(part.numel(), n_cls, dtype=torch.float64, device=x.device).scatter_add_(1, inv[idx], w)
        pred = votes.argmax(dim=1)  # first maximum = smallest class index
        correct[part] = (pred == inv[part]).double()
    return correct


def zero_shot_accuracy(image_embeddings: Tensor, class_embeddings: Tensor, labels: Tensor) -> float:
    """Top-1 zero-shot accuracy.

    ``image_embeddings [N, D]``, ``class_embeddings [C, D]`` (normalised, e.g. mean of the
    normalised prompt embeddings, re-normalised), ``labels [N]`` class indices in ``[0, C)``.
    Ties go to the smallest class index.
    """
    return mean_of_scores(zero_shot_correct_per_query(image_embeddings, class_embeddings, labels))


def zero_shot_correct_per_query(image_embeddings: Tensor, class_embeddings: Tensor, labels: Tensor) -> Tensor:
    """Per-image correctness of :func:`zero_shot_accuracy`: ``[N]`` float64 1/0."""
    x, y = _prep(image_embeddings, labels)
    c, _ = _prep(class_embeddings.to(x.device))
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"dim mismatch: images {x.shape[1]} vs classes {c.shape[1]}")
    correct = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, min(4096, ZERO_SHOT_BLOCK_SCORES // max(c.shape[0], 1)))  # [step, C] scores at a time
    for s in range(0, x.shape[0], step):
        pred = (x[s : s + step] @ c.to(x.dtype).T).argmax(dim=1)
        correct[s : s + step] = (pred == y[s : s + step]).double()
    return correct


def text_to_image_recall(
    text_embeddings: Tensor,
    image_embeddings: Tensor,
    text_groups: Tensor,
    image_groups: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Text→image Recall@K.

    Args:
        text_embeddings: ``[T, D]``; image_embeddings: ``[M, D]`` (both normalised).
        text_groups: ``[T]``; image_groups: ``[M]``. A text's relevant images are those with
            ``image_groups == text_groups[t]`` -- covers several captions per image (captions
            share the image's id) and several images per caption.
        ks: cut-offs; a K above M behaves like M.

    hit@K = any relevant image within the top K (tie rule: smallest image index first).
    Texts without a relevant image are skipped. Returns ``{K: recall}`` (``nan`` if no text counts).
    """
    hits = text_to_image_hits(text_embeddings, image_embeddings, text_groups, image_groups, ks=ks,
                              chunk_size=chunk_size)
    return {k: mean_of_scores(h) for k, h in hits.items()}


def text_to_image_hits(text_embeddings: Tensor, image_embeddings: Tensor, text_groups: Tensor, image_groups: Tensor, *,
                       ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[int, Tensor]:
    """Per-text hits of :func:`text_to_image_recall` (same arguments): ``{K: [T] float64 1/0}``, ``nan`` where skipped."""
    t, tg = _prep(text_embeddings, text_groups)
    _, ig = _prep(image_embeddings, image_groups)
    ig = ig.to(t.device)
    return _t2i_hits(t, image_embeddings, lambda s, e: tg[s:e, None] == ig[None, :], ks, chunk_size)


def caption_hits(text_embeddings: Tensor, image_embeddings: Tensor, relevant: Sequence[Sequence[int]], *,
                 ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[int, Tensor]:
    """Per-caption text→image hits with explicit relevant sets: ``{K: [T] float64 1/0}``, ``nan`` where skipped.

    ``text_embeddings [T, D]``, ``image_embeddings [M, D]``; ``relevant[t]``: the indices (into the
    images) relevant to caption ``t`` -- an image may carry several captions and a caption may
    belong to several images. Captions with no relevant image are skipped. Same ranking rules as
    :func:`text_to_image_recall`.
    """
    if len(relevant) != text_embeddings.shape[0]:
        raise ValueError(f"relevant has {len(relevant)} entries but there are {text_embeddings.shape[0]} texts")
    rows = torch.tensor([t for t, images in enumerate(relevant) for _ in images], dtype=torch.long)
    cols = torch.tensor([m for images in relevant for m in images], dtype=torch.long)
    m = image_embeddings.shape[0]
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= m):
        raise ValueError(f"relevant image indices must be in [0, {m})")

    def _relevance(s: int, e: int) -> Tensor:
        dense = torch.zeros(e - s, m, dtype=torch.bool)
        keep = (rows >= s) & (rows < e)
        dense[rows[keep] - s, cols[keep]] = True
        return dense.to(text_embeddings.device)

    return _t2i_hits(_prep(text_embeddings)[0], image_embeddings, _relevance, ks, chunk_size)


def _t2i_hits(t: Tensor, image_embeddings: Tensor, relevance: Callable[[int, int], Tensor], ks: Sequence[int],
              chunk_size: int) -> dict[int, Tensor]:
    """Hits@K of texts ``t [T, D]`` against images; ``relevance(s, e)`` is the ``[e-s, M]`` bool block of texts s..e."""
    _check_chunk(chunk_size)
    im, _ = _prep(image_embeddings.to(t.device))
    if im.shape[1] != t.shape[1]:
        raise ValueError(f"dim mismatch: texts {t.shape[1]} vs images {im.shape[1]}")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    m = im.shape[0]
    hits = {k: torch.full((t.shape[0],), float("nan"), dtype=torch.float64, device=t.device) for k in ks}
    if m == 0:
        return hits
    kmax = min(max(ks), m)
    im = im.to(t.dtype)
    for s in range(0, t.shape[0], chunk_size):
        e = min(s + chunk_size, t.shape[0])
        _, idx = _stable_topk(t[s:e] @ im.T, kmax)
        block = relevance(s, e)
        rel, valid = block.gather(1, idx), block.any(dim=1)
        for k in ks:
            hits[k][s:e] = torch.where(valid, rel[:, : min(k, kmax)].any(dim=1).double(), float("nan"))
    return hits


def map_by_query_source(
    embeddings: Tensor, labels: Tensor, sources: Sequence[str], *, include_query: bool = True, chunk_size: int = 1024,
    queries: Tensor | None = None,
) -> dict[str, float]:
    """Per-domain I2I mAP (GPR1200 style): each query ranks the *whole* set, APs averaged by the query's source.

    ``embeddings [N, D]``, ``labels [N]``, ``sources`` length N. Ranking within a source alone
    would be meaningless when a source holds one image per class (one emoji vendor), so the
    breakdown averages the global per-query APs. Returns ``{source: mAP}`` in sorted order;
    ``nan`` for a source whose queries are all skipped.
    """
    if len(sources) != embeddings.shape[0]:
        raise ValueError(f"sources has {len(sources)} entries but embeddings has {embeddings.shape[0]} rows")
    ap = image_to_image_ap(embeddings, labels, include_query=include_query, chunk_size=chunk_size, queries=queries)
    return mean_by_group(ap, sources)
