"""Streamed mining: the pool embedded and searched chunk by chunk gives exactly what the in-memory path gave."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from clipopt_core.data.captions import dedupe_texts
from clipopt_core.data.manifest import ingest, scan_source
from clipopt_core.models.encode import embed_images, embed_texts
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.train import mining
from clipopt_core.train.config import MiningConfig
from clipopt_core.train.mining import mine_captions, mine_pseudo_captions, top_k_chunked, top_k_streamed


def reference_top_k(images: torch.Tensor, texts: torch.Tensor, k: int, chunk_size: int,
                    image_chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory top-k as it was before streaming (verbatim logic): image blocks outside, text chunks inside."""
    parts = []
    for begin in range(0, images.shape[0], image_chunk_size):
        block = images[begin:begin + image_chunk_size]
        width = min(k, texts.shape[0])
        best_scores = torch.full((block.shape[0], 0), float("-inf"))
        best_ids = torch.zeros((block.shape[0], 0), dtype=torch.long)
        queries = np.ascontiguousarray(block.float().numpy())
        for start in range(0, texts.shape[0], chunk_size):
            chunk = np.ascontiguousarray(texts[start:start + chunk_size].float().numpy())
            scores_np, ids_np = faiss.knn(queries, chunk, min(width, chunk.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
            merged_scores = torch.cat([best_scores, torch.from_numpy(scores_np)], dim=1)
            merged_ids = torch.cat([best_ids, torch.from_numpy(ids_np) + start], dim=1)
            best_scores, order = merged_scores.topk(min(width, merged_scores.shape[1]), dim=1)
            best_ids = merged_ids.gather(1, order)
        parts.append((best_scores, best_ids))
    return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])


def tied_pool(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [23, 8] and a pool [70, 8] in which every text appears 3-4 times (exact ties across chunks)."""
    generator = torch.Generator().manual_seed(seed)
    distinct = F.normalize(torch.randn(20, 8, generator=generator), dim=-1)
    texts = distinct[torch.randint(0, 20, (70,), generator=generator)]
    images = F.normalize(torch.randn(23, 8, generator=generator), dim=-1)
    return images, texts


@pytest.mark.parametrize("chunk, image_chunk, k", [(7, 5, 4), (16, 64, 10), (70, 3, 1), (1, 23, 5), (9, 4, 100)])
def test_streamed_top_k_equals_the_in_memory_path_ties_included(chunk: int, image_chunk: int, k: int) -> None:
    images, texts = tied_pool(seed=chunk * 31 + k)
    expected = reference_top_k(images, texts, k, chunk, image_chunk)
    chunks = (texts[start:start + chunk] for start in range(0, len(texts), chunk))
    streamed = top_k_streamed(images, chunks, k, image_chunk_size=image_chunk)
    in_memory = top_k_chunked(images, texts, k, chunk_size=chunk, image_chunk_size=image_chunk)
    for got in (streamed, in_memory):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # ties really happen: some image's kept list holds two ids of one distinct text vector
    if k > 1:
        assert any(len(set(map(tuple, texts[row].tolist()))) < len(row) for row in expected[1])


def test_streamed_top_k_of_nothing() -> None:
    scores, ids = top_k_streamed(torch.empty(0, 8), iter([torch.ones(3, 8)]), 5)
    assert scores.shape == ids.shape == (0, 3)
    scores, ids = top_k_streamed(torch.ones(2, 8), iter([]), 5)
    assert scores.shape == ids.shape == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_search_finds_the_same_scores() -> None:
    images, texts = tied_pool(seed=3)
    expected = reference_top_k(images, texts, 5, 16, 8)
    scores, ids = top_k_streamed(images, (texts[s:s + 16] for s in range(0, 70, 16)), 5, image_chunk_size=8, device="cuda")
    torch.testing.assert_close(scores, expected[0])
    torch.testing.assert_close(torch.gather(images @ texts.T, 1, ids), expected[0])  # ties may swap ids


def test_mine_captions_streams_the_pool_and_matches_the_whole_pool_path(shapes_source: Path, caption_source: Path,
                                                                         tmp_path: Path, monkeypatch) -> None:
    """Same table as embedding the whole pool at once, and never more than one chunk embedded at a time."""
    torch.manual_seed(0)
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path)
    train = ingest(str(shapes_source), scan_source(str(shapes_source))).accepted
    pool = pl.read_csv(caption_source / "manifest.csv")["caption"].to_list() + train["caption"].to_list()
    config = MiningConfig(top_k=3, threshold=None, threshold_quantile=0.3, chunk_size=8)

    distinct = dedupe_texts(pool)
    expected, _ = mine_pseudo_captions(train["image_id"].to_list(), embed_images(bundle, train["uri"].to_list()),
                                       distinct, embed_texts(bundle, distinct), config)
    sizes: list[int] = []

    def recording_embed(bundle, texts, **kwargs):
        sizes.append(len(texts))
        return embed_texts(bundle, texts, **kwargs)

    monkeypatch.setattr(mining, "embed_texts", recording_embed)
    table, stats = mine_captions(bundle, train, pool, config)
    assert max(sizes) == 8 and sum(sizes) == len(distinct) == stats["pool_size"]
    assert table.select("image_id", "rank", "caption").equals(expected.select("image_id", "rank", "caption"))
    np.testing.assert_allclose(table["similarity"].to_numpy(), expected["similarity"].to_numpy(), atol=1e-6)
