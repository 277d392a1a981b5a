"""Caption tables: the realignment corpus and the mining pool, built from image–caption pairs and the splits."""
from __future__ import annotations

import polars as pl


def dedupe_texts(texts: list[str]) -> list[str]:
    """Distinct non-empty texts (whitespace-normalised, case kept), in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        clean = " ".join(str(text).split())
        if clean:
            seen.setdefault(clean, None)
    return list(seen)


def realign_pairs(caption_pairs: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Realignment corpus: caption-source pairs + training images that have a caption (``uri``, ``caption``, ``origin``)."""
    train = splits.filter((pl.col("split") == "train") & pl.col("caption").is_not_null())
    return pl.concat([
        caption_pairs.select("uri", "caption").with_columns(pl.lit("caption_source").alias("origin")),
        train.select("uri", "caption").with_columns(pl.lit("train_split").alias("origin")),
    ])


def caption_pool(caption_pairs: pl.DataFrame, splits: pl.DataFrame) -> list[str]:
    """Mining pool: caption-source texts + captions of training images (never val/test captions)."""
    train = splits.filter(pl.col("split") == "train")
    return dedupe_texts(caption_pairs["caption"].to_list() + [c for c in train["caption"].to_list() if c])
