"""Ranks of the relevant items of each query without sorting the query's row (for average precision).

The ranking rule is the one of :mod:`clipopt_core.evaluate.metrics`: similarity descending, equal
similarities by ascending index (a stable sort). The rank of item ``j`` in a row is therefore
``1 + #items scoring higher + #items scoring the same with a smaller index``; AP needs it only for the
row's P relevant items. Their P scores are sorted, every item of the row is placed among them by binary
search (O(N log P) instead of the O(N log N) of a full sort), and a histogram of the placements counts
the items above each relevant score. Exact ties with another item are rare; for those the items with a
smaller index are counted directly. See docs/method.md, "Evaluation".
"""
from __future__ import annotations

import torch
from torch import Tensor


def relevant_items(classes: Tensor, queries: Tensor, *, include_query: bool) -> tuple[Tensor, Tensor]:
    """``(row [R], column [R])`` of the relevant items of each query, row-major with ascending columns.

    ``classes [N]``: class id (0..C-1) of every item; ``queries [B]``: the query rows. An item is relevant
    to a query of its class; the query itself only when ``include_query``. Built from the class member
    lists, so no ``[B, N]`` mask is formed.
    """
    members = torch.sort(classes, stable=True).indices  # grouped by class, ascending within a class
    sizes = torch.bincount(classes)
    first = sizes.cumsum(0) - sizes
    per_row = sizes[classes[queries]]
    row = torch.repeat_interleave(torch.arange(queries.numel(), device=classes.device), per_row)
    offset = torch.arange(row.numel(), device=classes.device) - (per_row.cumsum(0) - per_row)[row]
    column = members[first[classes[queries]][row] + offset]
    if include_query:
        return row, column
    keep = column != queries[row]
    return row[keep], column[keep]


def relevant_ranks(sims: Tensor, row: Tensor, column: Tensor) -> Tensor:
    """1-based ranks ``[R]`` (int64) of the items ``(row, column)`` in their rows of ``sims [B, N]``.

    ``(row, column)`` as :func:`relevant_items` gives them (row-major). Items at ``-inf`` rank last.
    """
    thresholds, slot = _sorted_scores(sims, row, column)
    place = torch.searchsorted(thresholds, sims, out_int32=True)  # [B, N]: relevant scores strictly below
    b, width = thresholds.shape
    base = torch.arange(b, device=sims.device, dtype=torch.int32)[:, None] * (width + 1)
    histogram = torch.bincount((place + base).view(-1), minlength=b * (width + 1)).view(b, width + 1)
    above = histogram.flip(1).cumsum(1).flip(1)[:, 1:]  # item j is above threshold k iff place_j > k
    rank = above[row, slot] + 1
    # items scoring exactly a relevant score (the relevant item itself among them): more than one = a tie
    level = thresholds.gather(1, place.clamp_(max=width - 1).long())
    eq_row, eq_column = (level == sims).nonzero(as_tuple=True)
    equal = torch.zeros(b * width, dtype=torch.long, device=sims.device).index_add_(
        0, eq_row * width + place[eq_row, eq_column].long(), torch.ones_like(eq_row)).view(b, width)
    tied = (equal[row, slot] > 1).nonzero()[:, 0]
    score = sims[row, column]
    for chunk in tied.split(256):  # count the equal items with a smaller index directly
        earlier = torch.arange(sims.shape[1], device=sims.device)[None, :] < column[chunk, None]
        rank[chunk] += ((sims[row[chunk]] == score[chunk, None]) & earlier).sum(dim=1)
    return rank


def _sorted_scores(sims: Tensor, row: Tensor, column: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's relevant scores sorted ascending, padded with ``+inf`` (``[B, P]``), and for every relevant
    item the first sorted slot holding its score (``[R]``; equal scores share a slot's counts)."""
    b = sims.shape[0]
    per_row = torch.bincount(row, minlength=b)
    width = max(int(per_row.max()) if row.numel() else 0, 1)
    slot = torch.arange(row.numel(), device=sims.device) - (per_row.cumsum(0) - per_row)[row]
    thresholds = torch.full((b, width), float("inf"), dtype=sims.dtype, device=sims.device)
    thresholds[row, slot] = sims[row, column]
    thresholds, order = thresholds.sort(dim=1)
    positions = torch.arange(width, device=sims.device).expand_as(order)
    starts = torch.ones_like(thresholds, dtype=torch.bool)
    starts[:, 1:] = thresholds[:, 1:] != thresholds[:, :-1]
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    sorted_slot = first.gather(1, torch.empty_like(order).scatter_(1, order, positions))
    return thresholds, sorted_slot[row, slot]
