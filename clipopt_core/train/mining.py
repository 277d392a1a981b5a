"""Pseudo-caption mining (MCIP step 1): retrieve, do not generate.

For each training image (embedded by a *pretrained, unmodified* mining model: the base model
unless :class:`MiningConfig` names another, see :func:`mining_spec`) keep its top-k captions
of a deduplicated pool (embedded by the same model's text tower) whose cosine similarity
exceeds a threshold (docs/method.md#mining). The pool is embedded and scanned in chunks, merged
into a running top-k per image, so memory stays bounded by one chunk and ``images × chunk``
similarities, whatever the pool size. A pool stored as parquet (:class:`clipopt_core.train.text_pool.ParquetPool`)
is read in chunks too, and only the kept captions' texts are read back at the end.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np
import polars as pl
import torch

from clipopt_core.models.encode import embed_images, embed_texts
from clipopt_core.models.loading import ClipBundle, ModelSpec
from clipopt_core.train.config import MiningConfig
from clipopt_core.train.text_pool import InMemoryPool, TextPool


def mining_spec(config: MiningConfig, base: ModelSpec) -> ModelSpec:
    """The model that mines pseudo-captions: ``base`` itself (with its image size) when
    ``config.model_name`` is ``None``, else ``config.model_name``/``config.model_pretrained`` at
    that model's own input size (the authors used OpenAI ViT-L/14 for every model they trained)."""
    if config.model_name is None:
        if config.model_pretrained is not None:
            raise ValueError(f"mining model_pretrained={config.model_pretrained!r} needs model_name too "
                             "(or set both to None to mine with the base model)")
        return base
    return ModelSpec(name=config.model_name, pretrained=config.model_pretrained)


def top_k_chunked(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, k: int,
                  chunk_size: int = 65536, image_chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k texts per image over a text pool held in memory, both sides scanned in chunks.

    Args:
        image_embeddings: [N, D] normalised.
        text_embeddings: [T, D] normalised.
    Returns:
        scores [N, k'] descending and text ids [N, k'] (k' = min(k, T)), as :func:`top_k_streamed`.
    """
    chunks = (text_embeddings[start:start + chunk_size] for start in range(0, text_embeddings.shape[0], chunk_size))
    return top_k_streamed(image_embeddings, chunks, k, image_chunk_size=image_chunk_size)


def top_k_streamed(image_embeddings: torch.Tensor, text_chunks: Iterable[torch.Tensor], k: int, *,
                   image_chunk_size: int = 4096, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k texts per image over a pool that arrives chunk by chunk (e.g. embedded as it goes).

    Each text chunk is searched by every block of ``image_chunk_size`` images and merged into a
    running top-k, so memory holds one text chunk, one ``image_chunk_size × chunk`` block of
    similarities and the running ``N × k`` result, never the pool. Text ids count from 0 over the
    chunks in order. On the CPU the search is faiss's exact inner-product kNN; on a CUDA ``device``
    a matmul + ``topk`` there (equal scores may then be ranked in another order).

    Args:
        image_embeddings: [N, D] normalised.
        text_chunks: [T_i, D] normalised blocks of the pool, in pool order.
    Returns:
        scores [N, k'] descending and text ids [N, k'] (k' = min(k, T), T = Σ T_i), on the CPU.
    """
    blocks = [(start, image_embeddings[start:start + image_chunk_size])
              for start in range(0, image_embeddings.shape[0], image_chunk_size)]
    best = [(torch.empty(len(block), 0), torch.empty(len(block), 0, dtype=torch.long)) for _, block in blocks]
    offset = 0
    for chunk in text_chunks:
        for number, (_, block) in enumerate(blocks):
            scores, ids = _chunk_top_k(block, chunk, k, torch.device(device))
            best[number] = _merge_top_k(*best[number], scores, ids + offset, k)
        offset += chunk.shape[0]
    if not blocks:
        width = min(k, offset)
        return torch.empty(0, width), torch.empty(0, width, dtype=torch.long)
    return torch.cat([scores for scores, _ in best]), torch.cat([ids for _, ids in best])


def _chunk_top_k(images: torch.Tensor, texts: torch.Tensor, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, T) of images [n, D] against one text chunk [T, D] → CPU scores [n, k'] and chunk-local ids."""
    width = min(k, texts.shape[0])
    if device.type == "cuda":
        scores, ids = (images.to(device).float() @ texts.to(device).float().T).topk(width, dim=1)
        return scores.cpu(), ids.cpu()
    # faiss's blocked GEMM + heap: ~1.5x faster than torch matmul + topk here, and never holds
    # the whole [n, chunk] similarity matrix at once
    scores, ids = faiss.knn(np.ascontiguousarray(images.float().numpy()), np.ascontiguousarray(texts.float().numpy()),
                            width, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(scores), torch.from_numpy(ids)


def _merge_top_k(best_scores: torch.Tensor, best_ids: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k [n, ≤k] merged with a chunk's top [n, k'] (ids already global)."""
    merged_scores = torch.cat([best_scores, scores], dim=1)
    merged_ids = torch.cat([best_ids, ids], dim=1)
    best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
    return best_scores, merged_ids.gather(1, order)


def embed_pool_chunks(bundle: ClipBundle, pool: TextPool, chunk_size: int, *,
                      device: str = "cpu") -> Iterator[torch.Tensor]:
    """The pool's text embeddings, [≤chunk_size, D] normalised, one chunk at a time (pool order)."""
    for texts in pool.chunks(chunk_size):
        yield embed_texts(bundle, texts, device=device)


def mine_pseudo_captions(image_ids: list[str], image_embeddings: torch.Tensor, pool: list[str],
                         text_embeddings: torch.Tensor, config: MiningConfig) -> tuple[pl.DataFrame, float]:
    """Pseudo-captions per image → (long table, threshold used).

    Table columns: ``image_id``, ``rank`` (0 = most similar), ``caption``, ``similarity``.
    Images with no caption above the threshold have no rows.
    """
    scores, ids = top_k_chunked(image_embeddings, text_embeddings, config.top_k, config.chunk_size)
    return _caption_table(image_ids, scores, ids, lambda kept: [pool[i] for i in kept], config)


def _caption_table(image_ids: list[str], scores: torch.Tensor, ids: torch.Tensor,
                   texts_of: Callable[[Sequence[int]], list[str]], config: MiningConfig) -> tuple[pl.DataFrame, float]:
    """The long table of :func:`mine_pseudo_captions` from top-k scores / pool ids [N, k'], and the threshold used.

    ``texts_of(ids)`` gives the texts of pool ids; it is asked only for the ids kept above the threshold.
    """
    threshold = config.threshold
    if threshold is None:
        threshold = float(np.quantile(scores[:, 0].numpy(), config.threshold_quantile)) if len(scores) else 0.0
    keep = scores > threshold
    rows, ranks = keep.nonzero(as_tuple=True)
    table = pl.DataFrame({
        "image_id": [image_ids[r] for r in rows.tolist()],
        "rank": ranks.to(torch.int32).numpy(),
        "caption": texts_of(ids[rows, ranks].tolist()),
        "similarity": scores[rows, ranks].numpy().astype(np.float32),
    }, schema={"image_id": pl.String, "rank": pl.Int32, "caption": pl.String, "similarity": pl.Float32})
    return table, threshold


def caption_stats(table: pl.DataFrame, num_images: int, threshold: float) -> dict[str, float]:
    """Summary shown to users: captions per image, share without any, similarity range."""
    per_image = table.group_by("image_id").len()
    return {
        "threshold": threshold,
        "images": num_images,
        "captions_per_image": table.height / max(num_images, 1),
        "images_without_captions": num_images - per_image.height,
        "share_without_captions": (num_images - per_image.height) / max(num_images, 1),
        "similarity_min": float(table["similarity"].min()) if table.height else float("nan"),
        "similarity_max": float(table["similarity"].max()) if table.height else float("nan"),
    }


def similarity_histogram(table: pl.DataFrame, bins: int = 10) -> list[tuple[float, int]]:
    """(bin left edge, count) of the kept captions' similarities."""
    if not table.height:
        return []
    counts, edges = np.histogram(table["similarity"].to_numpy(), bins=bins)
    return [(round(float(edge), 3), int(count)) for edge, count in zip(edges[:-1], counts)]


def mine_captions(base: ClipBundle, train: pl.DataFrame, pool: Sequence[str] | TextPool, config: MiningConfig, *,
                  device: str = "cpu") -> tuple[pl.DataFrame, dict[str, float]]:
    """Pseudo-captions for the training images from ``pool``, mined with ``base``: the loaded,
    unmodified model of :func:`mining_spec` (the base model by default).

    ``pool``: a list of texts (deduplicated here, :class:`InMemoryPool`) or a :class:`TextPool` such as
    a :class:`clipopt_core.train.text_pool.ParquetPool` (already distinct; read chunk by chunk). The pool
    is embedded and searched ``config.chunk_size`` texts at a time on ``device`` (:func:`top_k_streamed`):
    memory holds the training images' embeddings [N, D], one text chunk and the running top-k [N, k],
    not the pool; the kept captions' texts (≤ N·k) are looked up at the end.
    """
    if isinstance(pool, Sequence):
        pool = InMemoryPool(pool)
    image_embeddings = embed_images(base, train["uri"].to_list(), device=device)
    scores, ids = top_k_streamed(image_embeddings, embed_pool_chunks(base, pool, config.chunk_size, device=device),
                                 config.top_k, device=device)
    table, threshold = _caption_table(train["image_id"].to_list(), scores, ids, pool.texts, config)
    return table, {**caption_stats(table, train.height, threshold), "pool_size": len(pool)}
