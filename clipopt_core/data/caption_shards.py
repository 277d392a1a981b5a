"""Image–caption corpora in webdataset tar shards (CC12M/LAION layout), local or any fsspec URL.

A sample is ``<key>.jpg|jpeg|png|webp`` + ``<key>.txt`` (the caption, UTF-8); a ``<key>.json`` with a
``"caption"`` string stands in for a missing ``.txt``. Shards are read as a stream
(:mod:`clipopt_core.data.tar_shards`); each image is decoded once to validate it and hashed, and its
``uri`` names its bytes inside the shard (:func:`~clipopt_core.data.tar_shards.member_uri`), so later
steps (realignment, the report's text→image benchmark) read one image with one ranged read.

The accepted table has the columns of a manifest-based caption corpus plus the image's content hash:
``uri``, ``caption``, ``sha256``. Rules follow :func:`clipopt_core.data.manifest.ingest` with
``captions_only``: a repeated (image bytes, caption) pair is a ``duplicate_pair``; an image whose bytes
were seen before takes the first one's ``uri`` (one image, several captions).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import polars as pl

from clipopt_core.data.images import ImageRejected, decode_image
from clipopt_core.data.manifest import ManifestError
from clipopt_core.data.sources import resolve_layout
from clipopt_core.data.tar_shards import iter_shards, member_uri

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PAIR_SCHEMA = {"uri": pl.String, "caption": pl.String, "sha256": pl.String}
REJECTED_SCHEMA = {"path": pl.String, "reason": pl.String, "detail": pl.String}


def is_shard_source(location: str) -> bool:
    """Whether a caption ``location`` is tar shards: a ``.tar`` URL, a ``{a..b}`` range, a ``::`` list,
    or a folder holding ``.tar`` files and no ``manifest.parquet``/``manifest.csv``
    (:func:`clipopt_core.data.sources.resolve_layout`, the rule of labelled sources too)."""
    return resolve_layout(location) == "shards"


def read_caption_shards(spec: str, *, storage_options: dict[str, Any] | None = None,
                        progress: Callable[[int], None] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(accepted pairs ``uri, caption, sha256``, rejected samples ``path, reason, detail``) of the shards of ``spec``.

    ``path`` of a rejection is ``<shard url>#<key>``. Raises :class:`~clipopt_core.data.manifest.ManifestError`
    when no sample is usable; :class:`~clipopt_core.data.tar_shards.ShardError` for a missing or broken shard.
    ``progress`` hears the number of samples read so far, every 10,000 samples.
    """
    accepted: dict[str, list[str]] = {"uri": [], "caption": [], "sha256": []}
    rejected: list[dict[str, str]] = []
    first_uri: dict[str, str] = {}  # image sha256 -> uri of its first occurrence
    seen_pairs: set[tuple[str, str]] = set()
    count = 0
    for count, sample in enumerate(iter_shards(spec, storage_options=storage_options), start=1):
        if progress and count % 10_000 == 0:
            progress(count)
        where = f"{sample['__url__']}#{sample['__key__']}"
        try:
            uri, caption, digest = _caption_pair(sample, first_uri)
        except ImageRejected as error:
            rejected.append({"path": where, "reason": error.reason, "detail": str(error)})
            continue
        if (digest, caption) in seen_pairs:
            rejected.append({"path": where, "reason": "duplicate_pair",
                             "detail": f"the same image with caption {caption!r} appeared before"})
            continue
        seen_pairs.add((digest, caption))
        for column, value in (("uri", uri), ("caption", caption), ("sha256", digest)):
            accepted[column].append(value)
    if not accepted["uri"]:
        reasons = pl.DataFrame(rejected)["reason"].value_counts().rows() if rejected else []
        raise ManifestError(f"no usable image-caption sample in shards {spec!r} ({count} samples; rejections: {reasons})")
    return pl.DataFrame(accepted, schema=PAIR_SCHEMA), pl.DataFrame(rejected, schema=REJECTED_SCHEMA)


def _caption_pair(sample: dict[str, Any], first_uri: dict[str, str]) -> tuple[str, str, str]:
    """(uri, caption, image sha256) of one sample; raises ``ImageRejected`` with the reason it is unusable."""
    ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ImageRejected("missing_image", f"no member with extension {'/'.join(SHARD_IMAGE_EXTENSIONS)}")
    caption = _caption_text(sample)
    data = sample[ext]
    decode_image(data, name=f"{sample['__key__']}.{ext}")
    digest = hashlib.sha256(data).hexdigest()
    uri = first_uri.setdefault(digest, member_uri(sample, ext))
    return uri, caption, digest


def _caption_text(sample: dict[str, Any]) -> str:
    """The sample's caption, whitespace-trimmed: ``.txt``, else the ``"caption"`` of ``.json``."""
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8")
        elif "json" in sample:
            text = json.loads(sample["json"].decode("utf-8")).get("caption") or ""
        else:
            raise ImageRejected("missing_caption", "no .txt member and no .json with a 'caption'")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ImageRejected("unreadable_caption", f"{type(error).__name__}: {error}") from error
    text = str(text).strip()
    if not text:
        raise ImageRejected("empty_caption", "caption is empty")
    return text
