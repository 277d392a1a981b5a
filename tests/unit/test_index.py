"""Unit tests for clipopt_core.serve.index (faiss inner-product indexes on unit vectors)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipopt_core.serve.index import (
    IndexSpec,
    auto_nlist,
    auto_pq_m,
    build_index,
    choose_index_kind,
    deserialize_index,
    recall_at_k_vs_exact,
    search,
    serialize_index,
)


def unit_normal(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def ivf_20k():
    x = unit_normal(20_000, 64)
    index, info = build_index(x, IndexSpec(kind="ivf_flat"), seed=0)
    return x, index, info


def test_flat_is_exact():
    x = unit_normal(2_000, 16)
    index, info = build_index(x)  # auto -> flat at this size
    assert info["kind"] == "flat" and info["nprobe"] is None and info["bytes"] == 2_000 * 16 * 4
    q = unit_normal(50, 16, seed=1)
    scores, ids = search(index, q, 5)
    sims = q @ x.T
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ref, axis=1), rtol=1e-5, atol=1e-6)
    assert ids.dtype == np.int64 and scores.shape == (50, 5)
    assert recall_at_k_vs_exact(index, x, k=10, sample=200) == 1.0


def test_ivf_auto_nprobe_reaches_target(ivf_20k):
    x, index, info = ivf_20k
    assert info["kind"] == "ivf_flat"
    assert info["nlist"] == 512  # round(4*sqrt(20000)) = 566, clipped to 20000 // 39 = 512
    assert info["train_size"] == 20_000  # min(N, 256 * nlist)
    assert 1 <= info["nprobe"] < info["nlist"]
    assert faiss.extract_index_ivf(index).nprobe == info["nprobe"]
    assert info["tuned_recall"] >= 0.95 and info["target_met"] is True
    # a query sample other than the tuning one
    assert recall_at_k_vs_exact(index, x, k=10, sample=1000, seed=1) >= 0.95
    assert info["build_seconds"] > 0 and info["bytes"] > 20_000 * 64 * 4


def test_explicit_nprobe_is_kept():
    x = unit_normal(3_000, 16)
    index, info = build_index(x, IndexSpec(kind="ivf_flat", nlist=32, nprobe=4))
    assert info["nprobe"] == 4 and faiss.extract_index_ivf(index).nprobe == 4
    assert 0 < info["tuned_recall"] <= 1


def test_serialize_roundtrip_and_validation(ivf_20k):
    x, index, info = ivf_20k
    data = serialize_index(index)
    assert isinstance(data, bytes)
    back = deserialize_index(data, expected_dim=64, expected_count=20_000)
    assert faiss.extract_index_ivf(back).nprobe == info["nprobe"]
    q = x[:20]
    s1, i1 = search(index, q, 10)
    s2, i2 = search(back, q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    with pytest.raises(ValueError, match="expected 32, found 64"):
        deserialize_index(data, expected_dim=32)
    with pytest.raises(ValueError, match="expected 19999, found 20000"):
        deserialize_index(data, expected_count=19_999)
    with pytest.raises(ValueError, match="could not deserialize"):
        deserialize_index(b"not an index at all")


def test_search_pads_with_minus_one():
    x = unit_normal(3, 8)
    index, _ = build_index(x)
    scores, ids = search(index, x[:2], 5)
    assert ids.dtype == np.int64
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert ids[0, 0] == 0 and ids[1, 0] == 1  # each vector's nearest is itself
    with pytest.raises(ValueError):
        search(index, unit_normal(2, 4), 1)  # wrong dimension


def test_choose_index_kind_rule():
    auto = IndexSpec()
    assert choose_index_kind(50_000, 1024, auto) == "flat"  # N <= 50k
    assert choose_index_kind(200_000, 64, auto) == "flat"  # 51 MB of vectors <= 64 MiB
    assert choose_index_kind(100_000, 512, auto) == "ivf_flat"  # 205 MB, fits 8 GiB
    assert choose_index_kind(10_000_000, 512, auto) == "ivf_pq"  # 20.6 GB > 8 GiB
    assert choose_index_kind(100_000, 512, IndexSpec(memory_budget_bytes=100 * 2**20)) == "ivf_pq"
    assert choose_index_kind(1_000, 8, IndexSpec(kind="hnsw")) == "hnsw"  # only when asked
    assert choose_index_kind(10, 8, IndexSpec(kind="ivf_flat")) == "ivf_flat"


def test_auto_sizes():
    assert auto_nlist(100_000) == 1265
    assert auto_nlist(100) == 2  # 40 clipped to 100 // 39
    assert auto_nlist(10) == 1
    # 10M x 512 in 8 GiB: largest divisor of 512 <= 128 with 10M * (m + 8) + centroids <= budget
    assert auto_pq_m(10_000_000, 512, 12_649, 8 * 2**30) == 128
    assert auto_pq_m(10_000_000, 512, 12_649, 1 * 2**30) == 64
    with pytest.raises(ValueError, match="do not fit"):
        auto_pq_m(10_000_000, 512, 12_649, 10 * 2**20)


def test_ivf_pq_builds_and_reports_recall():
    x = unit_normal(2_000, 16)
    index, info = build_index(x, IndexSpec(kind="ivf_pq", nlist=8, pq_m=4), seed=0)
    assert info["kind"] == "ivf_pq" and info["pq_m"] == 4 and info["nlist"] == 8
    assert isinstance(info["target_met"], bool) and 0 < info["tuned_recall"] <= 1
    assert info["bytes"] < 2_000 * 16 * 4  # compressed codes
    _, ids = search(index, x[:5], 3)
    assert ids.shape == (5, 3) and (ids >= 0).all()


def test_hnsw_tunes_ef_search():
    x = unit_normal(3_000, 16)
    index, info = build_index(x, IndexSpec(kind="hnsw", hnsw_m=16))
    assert info["kind"] == "hnsw" and info["ef_search"] == index.hnsw.efSearch
    assert info["target_met"] and recall_at_k_vs_exact(index, x, sample=300, seed=5) >= 0.9


def test_recall_degenerate_sizes():
    x = unit_normal(1, 8)
    index, _ = build_index(x)
    assert recall_at_k_vs_exact(index, x, k=0) == 1.0  # nothing to retrieve besides oneself
    x = unit_normal(5, 8)
    index, _ = build_index(x)
    assert recall_at_k_vs_exact(index, x, k=10) == 1.0  # k > N-1: all 4 others are found
