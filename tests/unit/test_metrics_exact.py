"""The sort-free average precision and the query sample of clipopt_core.evaluate.metrics against a slow
reference: the former implementation, which fully sorted every [chunk, N] similarity block (kept here only)."""

from __future__ import annotations

import pytest
import torch

from clipopt_core.evaluate.metrics import (
    image_to_image_ap,
    image_to_image_hits_at_1,
    image_to_image_map,
    knn_correct_per_query,
    map_by_query_source,
)


def reference_ap(x: torch.Tensor, y: torch.Tensor, *, include_query: bool) -> torch.Tensor:
    """AP per query from a full stable sort of each row (descending similarity, ties by ascending index)."""
    n = x.shape[0]
    _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    n_rel = counts[inv] - (0 if include_query else 1)
    sims = x.float() @ x.float().T
    rows = torch.arange(n)
    if not include_query:
        sims[rows, rows] = float("-inf")
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    rel = inv[order] == inv[:, None]
    if not include_query:
        rel &= order != rows[:, None]
    hits = rel.cumsum(dim=1, dtype=torch.int32)
    r, c = rel.nonzero(as_tuple=True)
    ap_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, r, hits[r, c].double() / (c + 1).double())
    return torch.where(n_rel > 0, ap_sum / n_rel.clamp(min=1).double(), torch.full((n,), float("nan"), dtype=torch.float64))


def tied_set(seed: int, n: int = 300, classes: int = 25, distinct: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings with many exact duplicates (``distinct`` different vectors) and varied class sizes (1..)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(distinct, 8, generator=g), dim=1)
    x = base[torch.randint(0, distinct, (n,), generator=g)]
    y = torch.randint(0, classes, (n,), generator=g) ** 2 % (classes + 3)  # uneven class sizes, some singletons
    return x, y


@pytest.mark.parametrize("include_query", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_equals_the_full_sort_reference_with_ties(include_query: bool, seed: int) -> None:
    x, y = tied_set(seed)
    want = reference_ap(x, y, include_query=include_query)
    for chunk in (1, 7, 1024):
        got = image_to_image_ap(x, y, include_query=include_query, chunk_size=chunk)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])  # bit for bit: same terms, same order


@pytest.mark.parametrize("include_query", [True, False])
def test_ap_equals_the_reference_on_continuous_scores_and_one_big_class(include_query: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1)
    y = torch.cat([torch.zeros(300, dtype=torch.long), torch.randint(1, 60, (200,), generator=g)])
    want = reference_ap(x, y, include_query=include_query)
    got = image_to_image_ap(x, y, include_query=include_query, chunk_size=64)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_ap_changes_when_a_positive_moves() -> None:
    x, y = tied_set(3, n=120)
    moved = x.clone()
    moved[1] = -moved[1]  # push one image away from everything similar
    assert not torch.equal(image_to_image_ap(moved, y), image_to_image_ap(x, y))
    torch.testing.assert_close(image_to_image_ap(moved, y), reference_ap(moved, y, include_query=True), rtol=0, atol=0)


def test_query_sample_scores_only_the_sampled_rows_against_the_whole_set() -> None:
    x, y = tied_set(4)
    queries = torch.tensor([0, 5, 17, 299])
    full_ap, full_hits = image_to_image_ap(x, y), image_to_image_hits_at_1(x, y)
    full_knn = knn_correct_per_query(x, y, k=5)
    sampled = {"ap": image_to_image_ap(x, y, queries=queries, chunk_size=3),
               "hits": image_to_image_hits_at_1(x, y, queries=queries, chunk_size=3),
               "knn": knn_correct_per_query(x, y, k=5, queries=queries, chunk_size=3)}
    for name, full in (("ap", full_ap), ("hits", full_hits), ("knn", full_knn)):
        got = sampled[name]
        torch.testing.assert_close(got[queries], full[queries], rtol=0, atol=0, equal_nan=True)
        others = torch.ones(x.shape[0], dtype=torch.bool)
        others[queries] = False
        assert got[others].isnan().all(), name
    assert image_to_image_map(x, y, queries=queries) == pytest.approx(float(full_ap[queries].nanmean()))
    by_source = map_by_query_source(x, y, ["a"] * 150 + ["b"] * 150, queries=queries)
    assert by_source["b"] == pytest.approx(float(full_ap[torch.tensor([299])].mean()))


def test_query_rows_out_of_range_are_refused() -> None:
    x, y = tied_set(0, n=10)
    with pytest.raises(ValueError, match=r"queries must be row indices in \[0, 10\)"):
        image_to_image_ap(x, y, queries=torch.tensor([10]))


def test_mean_by_group_averages_the_non_nan_scores_of_each_group() -> None:
    from clipopt_core.evaluate.aggregate import mean_by_group

    scores = torch.tensor([0.5, float("nan"), 1.0, 0.0, float("nan")], dtype=torch.float64)
    assert mean_by_group(scores, ["b", "a", "b", "a", "c"]) == pytest.approx({"a": 0.0, "b": 0.75, "c": float("nan")},
                                                                            nan_ok=True)
    assert list(mean_by_group(scores, ["z", "y", "x", "y", "z"])) == ["x", "y", "z"]
    with pytest.raises(ValueError, match="groups has 2 entries"):
        mean_by_group(scores, ["a", "b"])


@pytest.mark.parametrize("block", [1 << 26, 3 * 2000, 10])
def test_zero_shot_scores_in_blocks_bounded_by_the_class_count(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    from clipopt_core.evaluate import metrics

    monkeypatch.setattr(metrics, "ZERO_SHOT_BLOCK_SCORES", block)  # 1 << 26: one block; 6000: 3 rows; 10: 1 row
    g = torch.Generator().manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(2000, 4, generator=g), dim=1)
    images = torch.nn.functional.normalize(torch.randn(50, 4, generator=g), dim=1)
    labels = (images @ classes.T).argmax(dim=1)
    labels[::2] = (labels[::2] + 1) % 2000  # every other one wrong
    assert metrics.zero_shot_correct_per_query(images, classes, labels).tolist() == [0.0, 1.0] * 25
