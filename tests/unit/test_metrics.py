"""Unit tests for clipopt_core.evaluate.metrics: hand-computed 2-D cases, ties, sklearn agreement, chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from clipopt_core.evaluate.aggregate import group_means
from clipopt_core.evaluate.metrics import (
    caption_hits,
    image_to_image_ap,
    image_to_image_map,
    image_to_image_hits_at_1,
    image_to_image_recall_at_1,
    knn_accuracy,
    knn_correct_per_query,
    map_by_query_source,
    text_to_image_hits,
    text_to_image_recall,
    zero_shot_accuracy,
    zero_shot_correct_per_query,
)


def unit(*degrees: float) -> torch.Tensor:
    """Points on the unit circle at the given angles: [len(degrees), 2]."""
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1).float()


# ---------------------------------------------------------------- image -> image mAP / R@1

def test_map_hand_computed_include_and_exclude():
    # angles 0, 10, 30, 90 deg; labels 0, 1, 0, 1 -> cos sims are well separated
    x, y = unit(0, 10, 30, 90), torch.tensor([0, 1, 0, 1])
    # q0 ranking 0,1,2,3 rel {0,2}: incl (1/1 + 2/3)/2 = 5/6 ; excl ranking 1,2,3 -> 2 at rank 2: 1/2
    # q1 ranking 1,0,2,3 rel {1,3}: incl (1/1 + 2/4)/2 = 3/4 ; excl ranking 0,2,3 -> 3 at rank 3: 1/3
    # q2 ranking 2,1,0,3 rel {2,0}: incl (1 + 2/3)/2 = 5/6   ; excl ranking 1,0,3 -> 0 at rank 2: 1/2
    # q3 ranking 3,2,1,0 rel {3,1}: incl (1 + 2/3)/2 = 5/6   ; excl ranking 2,1,0 -> 1 at rank 2: 1/2
    ap_in = image_to_image_ap(x, y, include_query=True)
    ap_ex = image_to_image_ap(x, y, include_query=False)
    assert ap_in.tolist() == pytest.approx([5 / 6, 3 / 4, 5 / 6, 5 / 6])
    assert ap_ex.tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 2, 1 / 2])
    assert image_to_image_map(x, y) == pytest.approx(39 / 48)  # (10+9+10+10)/12 / 4
    assert image_to_image_map(x, y, include_query=False) == pytest.approx(11 / 24)
    # R@1 (query excluded): nn(0)=1 miss, nn(1)=0 miss, nn(2)=1 miss, nn(3)=2 miss
    assert image_to_image_recall_at_1(x, y) == 0.0


def test_map_ties_and_singletons():
    # q=(1,0) label 0, a=(.6,.8) label 1 (singleton), b=(.6,-.8) label 0.
    # sim(q,a) == sim(q,b) == 0.6 exactly -> tie broken by index: a (1) before b (2).
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    y = torch.tensor([0, 1, 0])
    assert (x[0] @ x[1]).item() == (x[0] @ x[2]).item()
    # include_query:
    #   q: ranking q, a, b ; rel {q, b} at ranks 1, 3 -> (1 + 2/3)/2 = 5/6 (would be 1 if b came first)
    #   a: ranking a, q, b ; rel {a} at rank 1 -> 1   (singleton counts: query itself is a hit)
    #   b: ranking b, q, a ; rel {b, q} ranks 1, 2 -> 1
    ap = image_to_image_ap(x, y, include_query=True)
    assert ap.tolist() == pytest.approx([5 / 6, 1.0, 1.0])
    assert image_to_image_map(x, y) == pytest.approx(17 / 18)
    # exclude: q: ranking a, b -> b at rank 2: 1/2 ; a: singleton -> skipped ; b: q at rank 1: 1
    ap = image_to_image_ap(x, y, include_query=False)
    assert ap[0].item() == pytest.approx(0.5) and math.isnan(ap[1].item()) and ap[2].item() == 1.0
    assert image_to_image_map(x, y, include_query=False) == pytest.approx(3 / 4)
    # R@1: q's nn is the tie -> a (smaller index), wrong label; b's nn is q: hit; a skipped -> 1/2
    assert image_to_image_recall_at_1(x, y) == pytest.approx(0.5)
    hits = image_to_image_hits_at_1(x, y)
    assert hits[0].item() == 0.0 and math.isnan(hits[1].item()) and hits[2].item() == 1.0


def test_map_query_tied_with_earlier_duplicate_keeps_its_own_position():
    # x0 == x1 exactly, labels 0, 1, 1; x2 = (0,1).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    # include: q0 ranking 0,1,2 rel {0} -> 1
    #          q1 ranking 0,1,2 (tie 0 before self) rel {1,2} ranks 2,3 -> (1/2 + 2/3)/2 = 7/12
    #          q2 ranking 2,0,1 (tie 0 before 1) rel {2,1} ranks 1,3 -> (1 + 2/3)/2 = 5/6
    assert image_to_image_ap(x, y).tolist() == pytest.approx([1.0, 7 / 12, 5 / 6])
    # exclude: q0 skipped; q1 ranking 0,2 -> 1/2; q2 ranking 0,1 -> 1/2
    assert image_to_image_map(x, y, include_query=False) == pytest.approx(0.5)


def test_all_singletons_exclude_is_nan():
    x, y = unit(0, 45, 90), torch.tensor([0, 1, 2])
    assert image_to_image_map(x, y) == 1.0  # each query finds only itself, at rank 1
    assert math.isnan(image_to_image_map(x, y, include_query=False))
    assert math.isnan(image_to_image_recall_at_1(x, y))


@pytest.mark.parametrize("include_query", [True, False])
def test_ap_agrees_with_sklearn(include_query):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(80, 8, generator=g), dim=1)
    y = torch.randint(0, 6, (80,), generator=g)
    y[0] = 99  # a singleton class
    ours = image_to_image_ap(x, y, include_query=include_query, chunk_size=7).numpy()
    sims = (x @ x.T).numpy().astype(np.float64)
    ref = []
    for q in range(len(y)):
        keep = np.ones(len(y), bool)
        if not include_query:
            keep[q] = False
        truth = (y.numpy() == y[q].item())[keep]
        ref.append(average_precision_score(truth, sims[q][keep]) if truth.any() else np.nan)
    np.testing.assert_allclose(ours, np.array(ref), rtol=1e-6, equal_nan=True)
    assert image_to_image_map(x, y, include_query=include_query) == pytest.approx(np.nanmean(ref))


# ---------------------------------------------------------------- kNN

def test_knn_two_close_outvote_three_far():
    # q(0deg) label 0; c1(10), c2(-10) label 0; f1(60), f2(-60), f3(180) label 1; k=5 = all others.
    x, y = unit(0, 10, -10, 60, -60, 180), torch.tensor([0, 0, 0, 1, 1, 1])
    # T=0.1, q: class0 = 2*exp(cos10/.1) = 2e^9.85 ; class1 = 2e^5 + e^-10 -> class 0 (majority says 1)
    # c1: class0 e^9.85 + e^9.40 vs class1 e^6.43+e^3.42+e^-9.85 -> 0 ok ; c2 likewise ok
    # f1: class0 {q .5, c1 .643, c2 .342} vs class1 {-.5, -.5} -> 0, wrong ; f2 likewise wrong
    # f3: class0 {-1, -.985, -.985} vs class1 {-.5, -.5}: 2e^-5 > 2e^-9.85 + e^-10 -> 1, ok
    assert knn_accuracy(x, y, k=5, temperature=0.1) == pytest.approx(4 / 6)
    # near-uniform weights = majority vote: every query is outvoted 3:2 by the other class
    assert knn_accuracy(x, y, k=5, temperature=1e6) == 0.0


def test_knn_vote_tie_goes_to_smallest_class():
    # q=(1,0) label 1; a=(.6,.8) label 2; b=(.6,-.8) label 1; k=2
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    y = torch.tensor([1, 2, 1])
    # q: neighbours a (.6, class 2), b (.6, class 1): equal votes -> smallest label 1 -> correct
    # a: q (.6, 1), b (-.28, 1) -> 1, wrong ; b: q (.6, 1), a (-.28, 2) -> 1, correct
    assert knn_accuracy(x, y, k=2) == pytest.approx(2 / 3)
    # k=1: q's single neighbour is the tie -> a (index 1), class 2 -> wrong; a -> q wrong; b -> q ok
    assert knn_accuracy(x, y, k=1) == pytest.approx(1 / 3)
    assert knn_correct_per_query(x, y, k=2).tolist() == [1.0, 0.0, 1.0]
    assert knn_correct_per_query(x, y, k=1).tolist() == [0.0, 0.0, 1.0]


def test_knn_k_larger_than_set_and_huge_similarity_scale():
    x, y = unit(0, 5, 90, 95), torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(x, y, k=21, temperature=0.001) == 1.0  # k clipped to N-1, no overflow
    assert math.isnan(knn_accuracy(x[:1], y[:1]))


# ---------------------------------------------------------------- zero-shot

def test_zero_shot_hand_computed_and_tie():
    s = math.sqrt(0.5)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [s, s]])
    cls = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # preds 0, 1, 1, tie(s, s) -> class 0 ; labels 0, 1, 0, 0 -> 3/4
    assert zero_shot_accuracy(img, cls, torch.tensor([0, 1, 0, 0])) == pytest.approx(3 / 4)
    assert zero_shot_correct_per_query(img, cls, torch.tensor([0, 1, 0, 0])).tolist() == [1.0, 1.0, 0.0, 1.0]


# ---------------------------------------------------------------- text -> image

def test_t2i_groups_multi_caption_multi_image_and_empty():
    # images: i0 (1,0) g0 ; i1 (0,1) g1 ; i2 (.6,.8) g1 (two images per caption group) ; i3 (-1,0) g2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    ig = torch.tensor([0, 1, 1, 2])
    # texts t0..t2 = (.8,.6): sims i0 .8, i1 .6, i2 .96, i3 -.8 -> ranking i2, i0, i1, i3
    #   t0 g1: i2 at rank 1 ; t1 g0: i0 at rank 2 ; t2 g2: i3 at rank 4
    #   t3 g7: no relevant image -> skipped ; t4 (1,0) g0 (2nd caption of i0): rank 1
    txt = torch.tensor([[0.8, 0.6]] * 4 + [[1.0, 0.0]])
    tg = torch.tensor([1, 0, 2, 7, 0])
    r = text_to_image_recall(txt, img, tg, ig, ks=(1, 2, 3, 10))
    # counted texts: t0, t1, t2, t4 -> R@1 {t0,t4} 2/4 ; R@2 +t1 3/4 ; R@3 3/4 ; R@10 (=all 4) 4/4
    assert r == pytest.approx({1: 0.5, 2: 0.75, 3: 0.75, 10: 1.0})
    assert all(math.isnan(v) for v in text_to_image_recall(txt[3:4], img, tg[3:4], ig).values())
    per_text = text_to_image_hits(txt, img, tg, ig, ks=(1, 2))
    assert per_text[1][[0, 1, 2, 4]].tolist() == [1.0, 0.0, 0.0, 1.0] and math.isnan(per_text[1][3].item())
    assert per_text[2][[0, 1, 2, 4]].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_caption_hits_with_overlapping_relevant_sets():
    # i0 (1,0) carries captions c0 and c1; i1 (0,1) carries c1 as well (two images share a caption)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # c0 = (0,1): ranking i1, i2, i0 -> its only image i0 at rank 3
    # c1 = (0,1): same ranking, relevant {i0, i1} -> rank 1
    # c2 = (1,0): relevant {} -> skipped
    txt = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    hits = caption_hits(txt, img, [[0], [0, 1], []], ks=(1, 3))
    assert hits[1][:2].tolist() == [0.0, 1.0] and hits[3][:2].tolist() == [1.0, 1.0]
    assert math.isnan(hits[1][2].item())
    # the same relevance written as groups gives the same hits where one group per image suffices
    assert caption_hits(txt[:1], img, [[0]], ks=(1, 3))[3].tolist() == [1.0]
    with pytest.raises(ValueError, match="relevant image indices"):
        caption_hits(txt[:1], img, [[3]])
    with pytest.raises(ValueError, match="relevant has 1 entries"):
        caption_hits(txt, img, [[0]])


def test_t2i_tie_by_image_index():
    img = torch.tensor([[0.6, 0.8], [0.6, -0.8]])  # both 0.6 against the text
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # text g1 (wants i1): i0 comes first on the tie -> miss@1, hit@2 ; text g0: hit@1
    r = text_to_image_recall(txt, img, torch.tensor([1, 0]), torch.tensor([0, 1]), ks=(1, 2))
    assert r == {1: 0.5, 2: 1.0}


# ---------------------------------------------------------------- chunking

def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(40, 4, generator=g), dim=1)
    x[10] = x[3]  # exact duplicates create ties that straddle chunks
    x[30] = x[3]
    y = torch.randint(0, 5, (40,), generator=g)
    y[7] = 50  # singleton
    t = torch.nn.functional.normalize(torch.randn(23, 4, generator=g), dim=1)
    tg = torch.randint(0, 8, (23,), generator=g)
    for inc in (True, False):
        assert image_to_image_map(x, y, include_query=inc, chunk_size=3) == image_to_image_map(
            x, y, include_query=inc, chunk_size=1024
        )
    assert image_to_image_recall_at_1(x, y, chunk_size=3) == image_to_image_recall_at_1(x, y)
    assert knn_accuracy(x, y, chunk_size=3) == knn_accuracy(x, y, chunk_size=1024)
    assert text_to_image_recall(t, x, tg, y, chunk_size=3) == text_to_image_recall(t, x, tg, y)


# ---------------------------------------------------------------- aggregation

def test_group_means_ignores_nan_and_missing():
    m = {"i2i_map": 0.8, "i2i_r1": 0.6, "knn_top1": float("nan"), "zs_top1": 0.5,
         "t2i_r1": 0.2, "t2i_r5": 0.4, "other": 9.0}
    out = group_means(m)
    assert out["i2i_mean"] == pytest.approx(0.7)
    assert math.isnan(out["knn_mean"])
    assert out["zs_mean"] == 0.5
    assert out["t2i_mean"] == pytest.approx(0.4)  # the paper's T2I column is R@5 alone
    assert out["avg"] == pytest.approx((0.8 + 0.6 + 0.5 + 0.4) / 4)  # headline columns only; t2i_r1 is detail
    assert set(out) == {"i2i_mean", "knn_mean", "zs_mean", "t2i_mean", "avg"}


def test_map_by_query_source_averages_global_aps_per_source():
    # the hand-computed case above: per-query APs (query excluded) 1/2, 1/3, 1/2, 1/2
    x, y = unit(0, 10, 30, 90), torch.tensor([0, 1, 0, 1])
    out = map_by_query_source(x, y, ["a", "b", "a", "b"], include_query=False)
    assert list(out) == ["a", "b"]
    assert out["a"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert out["b"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_map_by_query_source_ranks_against_the_whole_set():
    # one image per class in each source (like one emoji vendor): within-source ranking would be trivial
    x, y = unit(0, 90, 5, 80), torch.tensor([0, 1, 0, 1])
    out = map_by_query_source(x, y, ["google", "google", "twitter", "twitter"], include_query=False)
    assert out == {"google": pytest.approx(1.0), "twitter": pytest.approx(1.0)}
    # angles 0, 90, 80, 5 with labels 0, 1, 0, 1:
    # q0 (0°): 5°(1), 80°(0), 90°(1) -> relevant at rank 2: 1/2;  q1 (90°): 80°(0), 5°(1) -> rank 2: 1/2
    # q2 (80°): 90°(1), 5°(1), 0°(0) -> rank 3: 1/3;             q3 (5°): 0°(0), 80°(0), 90°(1) -> rank 3: 1/3
    shuffled = map_by_query_source(unit(0, 90, 80, 5), y, ["google", "google", "twitter", "twitter"],
                                   include_query=False)
    assert shuffled["google"] == pytest.approx(1 / 2) and shuffled["twitter"] == pytest.approx(1 / 3)


def test_stable_topk_matches_stable_sort_with_many_ties():
    from clipopt_core.evaluate.metrics import _stable_topk

    g = torch.Generator().manual_seed(3)
    sims = torch.randint(0, 4, (50, 30), generator=g).float()  # heavy ties everywhere
    for k in (1, 5, 29, 30):
        vals, idx = _stable_topk(sims, k)
        ref = torch.sort(sims, dim=1, descending=True, stable=True)
        assert torch.equal(idx, ref.indices[:, :k]) and torch.equal(vals, ref.values[:, :k])
