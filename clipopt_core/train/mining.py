"""Pseudo-caption mining (MCIP step 1): retrieve, do not generate.

For each training image (embedded by a *pretrained, unmodified* mining model: the base model
unless :class:`MiningConfig` names another, see :func:`mining_spec`) keep its top-k captions
of a deduplicated pool (embedded by the same model's text tower) whose cosine similarity
exceeds a threshold (docs/method.md#mining). The pool is scanned in chunks so memory stays
bounded by ``images × chunk`` similarities, whatever the pool size.
"""
from __future__ import annotations

import faiss
import numpy as np
import polars as pl
import torch

from clipopt_core.data.captions import dedupe_texts
from clipopt_core.models.encode import embed_images, embed_texts
from clipopt_core.models.loading import ClipBundle, ModelSpec
from clipopt_core.train.config import MiningConfig


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
    """Exact top-k texts per image over a text pool, both sides scanned in chunks.

    Peak memory stays below one ``image_chunk_size × chunk_size`` float32 block (1 GiB at the
    defaults) plus the running top-k, whatever the number of images and texts.

    Args:
        image_embeddings: [N, D] normalised.
        text_embeddings: [T, D] normalised.
    Returns:
        scores [N, k'] descending and text ids [N, k'] (k' = min(k, T)).
    """
    parts = [_top_k_over_texts(image_embeddings[start:start + image_chunk_size], text_embeddings, k, chunk_size)
             for start in range(0, image_embeddings.shape[0], image_chunk_size)]
    if not parts:
        k = min(k, text_embeddings.shape[0])
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat([scores for scores, _ in parts]), torch.cat([ids for _, ids in parts])


def _top_k_over_texts(images: torch.Tensor, texts: torch.Tensor, k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one image block [n, D] against all texts [T, D], merging text chunks as they come."""
    k = min(k, texts.shape[0])
    best_scores = torch.full((images.shape[0], 0), float("-inf"))
    best_ids = torch.zeros((images.shape[0], 0), dtype=torch.long)
    queries = np.ascontiguousarray(images.float().numpy())
    for start in range(0, texts.shape[0], chunk_size):
        block = np.ascontiguousarray(texts[start:start + chunk_size].float().numpy())
        # faiss's blocked GEMM + heap: ~1.5x faster than torch matmul + topk here, and never holds
        # the whole [n, chunk] similarity matrix at once
        scores_np, ids_np = faiss.knn(queries, block, min(k, block.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
        scores, ids = torch.from_numpy(scores_np), torch.from_numpy(ids_np)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_ids = torch.cat([best_ids, ids + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_ids = merged_ids.gather(1, order)
    return best_scores, best_ids


def mine_pseudo_captions(image_ids: list[str], image_embeddings: torch.Tensor, pool: list[str],
                         text_embeddings: torch.Tensor, config: MiningConfig) -> tuple[pl.DataFrame, float]:
    """Pseudo-captions per image → (long table, threshold used).

    Table columns: ``image_id``, ``rank`` (0 = most similar), ``caption``, ``similarity``.
    Images with no caption above the threshold have no rows.
    """
    scores, ids = top_k_chunked(image_embeddings, text_embeddings, config.top_k, config.chunk_size)
    threshold = config.threshold
    if threshold is None:
        threshold = float(np.quantile(scores[:, 0].numpy(), config.threshold_quantile)) if len(scores) else 0.0
    keep = scores > threshold
    rows, ranks = keep.nonzero(as_tuple=True)
    table = pl.DataFrame({
        "image_id": [image_ids[r] for r in rows.tolist()],
        "rank": ranks.to(torch.int32).numpy(),
        "caption": [pool[i] for i in ids[rows, ranks].tolist()],
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


def mine_captions(base: ClipBundle, train: pl.DataFrame, pool: list[str], config: MiningConfig, *,
                  device: str = "cpu") -> tuple[pl.DataFrame, dict[str, float]]:
    """Pseudo-captions for the training images from ``pool``, mined with ``base``: the loaded,
    unmodified model of :func:`mining_spec` (the base model by default)."""
    pool = dedupe_texts(pool)
    image_embeddings = embed_images(base, train["uri"].to_list(), device=device)
    text_embeddings = embed_texts(base, pool, device=device)
    table, threshold = mine_pseudo_captions(train["image_id"].to_list(), image_embeddings, pool, text_embeddings, config)
    return table, {**caption_stats(table, train.height, threshold), "pool_size": len(pool)}
