"""Caption tables: the held-out split of the image–caption corpus, the realignment corpus and the mining pool.

docs/method.md ("Evaluation"): text→image retrieval is measured on image–caption pairs that
are separate from the image→image sets and never trained on. The caption corpus therefore gets
its own split, independent of the class split: ``train`` pairs feed realignment and the mining
pool, ``val`` pairs select the realignment checkpoint, ``test`` pairs are only for the report.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import polars as pl

CAPTION_SPLITS = ("train", "val", "test")


def dedupe_texts(texts: list[str]) -> list[str]:
    """Distinct non-empty texts (whitespace-normalised, case kept), in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        clean = " ".join(str(text).split())
        if clean:
            seen.setdefault(clean, None)
    return list(seen)


def normalise_caption(text: str) -> str:
    """The identity of a caption: lower case, whitespace collapsed ("A  Cat" and "a cat" are one caption)."""
    return " ".join(str(text).lower().split())


# Python's str.split() whitespace: Unicode White_Space (the regex class \s) plus the separators U+001C..U+001F
_WHITESPACE_RUN = r"[\s\x{1C}-\x{1F}]+"


def normalised_caption(column: str | pl.Expr) -> pl.Expr:
    """:func:`normalise_caption` as a polars expression (same text for every string), so a column of any
    length is normalised inside polars, without a Python string per row."""
    expr = pl.col(column) if isinstance(column, str) else column
    return expr.cast(pl.String).str.to_lowercase().str.replace_all(_WHITESPACE_RUN, " ").str.strip_chars(" ")


def split_caption_pairs(pairs: pl.DataFrame, *, val_fraction: float, test_fraction: float, seed: int = 0) -> pl.DataFrame:
    """Add a ``split`` column (train / val / test) to image–caption ``pairs`` (columns ``uri``, ``caption``).

    Pairs are split by *group*: the connected components of "same image" and "same normalised
    caption", so all captions of one image land in one split, and so do all images that carry the
    same caption -- a test caption (or test image) is never trained on. A group's split depends
    only on ``(seed, its smallest normalised caption)``, like :func:`clipopt_core.data.manifest.split_by_class`:
    the fractions hold in expectation over groups, and adding pairs moves no other group.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"caption val_fraction={val_fraction}, test_fraction={test_fraction}: each in [0,1), sum < 1")
    if pairs.height == 0:
        return pairs.with_columns(pl.lit(None, dtype=pl.String).alias("split"))
    texts = [normalise_caption(c) for c in pairs["caption"].to_list()]
    groups = _group_keys(pairs["uri"].to_list(), texts)

    def _split(key: str) -> str:
        draw = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
        if draw < test_fraction:
            return "test"
        return "val" if draw < test_fraction + val_fraction else "train"

    return pairs.with_columns(pl.Series("split", [_split(key) for key in groups], dtype=pl.String))


def _group_keys(uris: list[str], texts: list[str]) -> list[str]:
    """Per pair, the smallest normalised caption of its component (images and captions joined by pairs)."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for uri, text in zip(uris, texts):
        a, b = find("i:" + uri), find("t:" + text)
        if a != b:
            parent[max(a, b)] = min(a, b)
    smallest: dict[str, str] = {}
    for text in texts:
        root = find("t:" + text)
        smallest[root] = min(smallest.get(root, text), text)
    return [smallest[find("t:" + text)] for text in texts]


Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def caption_split(caption_pairs: Frame, split: str, columns: Sequence[str] = ("uri", "caption")) -> Frame:
    """The pairs of one caption split (``columns``, by default ``uri``, ``caption``); raises when the corpus was never split.

    A lazy ``caption_pairs`` (e.g. a parquet scan) gives a lazy result."""
    if split not in CAPTION_SPLITS:
        raise ValueError(f"unknown caption split {split!r}; one of {CAPTION_SPLITS}")
    if "split" not in caption_pairs.lazy().collect_schema().names():
        raise ValueError("the caption pairs have no 'split' column: split them with "
                         "clipopt_core.data.captions.split_caption_pairs (the caption_corpus asset does)")
    return caption_pairs.filter(pl.col("split") == split).select(*columns)


def realign_validation_pairs(caption_pairs: Frame) -> Frame:
    """The validation pairs ``(uri, caption)`` that select the realignment checkpoint."""
    return caption_split(caption_pairs, "val")


def caption_test_pairs(caption_pairs: pl.DataFrame) -> pl.DataFrame:
    """The held-out pairs ``(uri, caption)`` of the report's text→image retrieval."""
    return caption_split(caption_pairs, "test")


def realign_pairs(caption_pairs: Frame, splits: pl.DataFrame) -> Frame:
    """Realignment corpus (``uri``, ``caption``, ``origin``; plus ``sha256``, the image's content hash, when
    both inputs have it): train caption pairs + training images with a caption.

    A caption whose normalised text is held out (:func:`held_out_texts`) is left out wherever it
    comes from, so no held-out caption or class name is ever trained on. A lazy ``caption_pairs`` (a
    scan of a corpus of 10⁷ pairs) gives a lazy corpus: only the held-out texts are collected.
    """
    held_out = held_out_texts(caption_pairs, splits)
    names = caption_pairs.lazy().collect_schema().names()
    columns = ["uri", "caption", *(["sha256"] if "sha256" in names and "sha256" in splits.columns else [])]
    train = splits.filter((pl.col("split") == "train") & pl.col("caption").is_not_null())
    corpus = pl.concat([
        caption_split(caption_pairs.lazy(), "train", columns).with_columns(pl.lit("caption_source").alias("origin")),
        train.lazy().select(columns).with_columns(pl.lit("train_split").alias("origin")),
    ]).filter(~normalised_caption("caption").is_in(pl.Series(held_out, dtype=pl.String).implode()))
    return corpus if isinstance(caption_pairs, pl.LazyFrame) else corpus.collect()


def caption_pool(caption_pairs: pl.DataFrame, splits: pl.DataFrame) -> list[str]:
    """Mining pool: train caption texts + captions of training images, never a held-out text (:func:`held_out_texts`)."""
    held_out = pl.Series(held_out_texts(caption_pairs, splits), dtype=pl.String)
    train = splits.filter(pl.col("split") == "train")
    texts = caption_split(caption_pairs, "train")["caption"].to_list() + [c for c in train["caption"].to_list() if c]
    pool = pl.DataFrame({"text": dedupe_texts(texts)}, schema={"text": pl.String})
    return pool.filter(~normalised_caption("text").is_in(held_out.implode()))["text"].to_list()


def realignment_selection_pairs(caption_pairs: pl.DataFrame | pl.LazyFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Pairs (``uri``, ``caption``) that select the realignment checkpoint: the caption corpus's val pairs,
    or, when it has none (a small corpus), the val images' own captions (class names of the val split)."""
    pairs = realign_validation_pairs(caption_pairs.lazy()).collect()
    if pairs.height:
        return pairs
    return splits.filter((pl.col("split") == "val") & pl.col("caption").is_not_null()).select("uri", "caption")


def held_out_texts(caption_pairs: pl.DataFrame | pl.LazyFrame, splits: pl.DataFrame) -> list[str]:
    """Normalised texts no training stage may see: captions of val/test caption pairs, and captions and
    class names of val/test images (an openclipart title "horse" must not teach the held-out class "horse").

    Only the held-out texts are collected (a lazy ``caption_pairs`` is filtered to its val/test splits in polars)."""
    lazy = caption_pairs.lazy()
    held = pl.concat([caption_split(lazy, split, ["caption"]) for split in ("val", "test")])
    evaluated = splits.filter(pl.col("split") != "train")
    parts = [held.select(normalised_caption("caption").alias("text")).collect()]
    parts += [evaluated.filter(pl.col(column).is_not_null() & (pl.col(column) != ""))
              .select(normalised_caption(column).alias("text")) for column in ("caption", "label")
              if column in evaluated.columns]
    return sorted(set(pl.concat(parts)["text"].to_list()))
