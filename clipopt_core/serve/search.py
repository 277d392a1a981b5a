"""Search a published index: one embedding per image answers image and text queries.

A :class:`SearchService` is one immutable (model, index, id table) triple loaded together and
checked to belong together: the index's vectors were embedded by exactly the weights it serves
(shard sidecars' ``model_key`` = :func:`clipopt_core.layout.served_model_key`). Queries embed
through :mod:`clipopt_core.models.encode`, the gallery's own decoding and preprocessing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import polars as pl

from clipopt_core.data.images import decode_image
from clipopt_core.layout import Keys
from clipopt_core.models.encode import embed_images, embed_texts
from clipopt_core.models.loading import ClipBundle, ModelSpec, load_model
from clipopt_core.runtime.storage import ArtifactStore, sha256_file
from clipopt_core.serve import index as index_lib
from clipopt_core.serve.champion import resolve_served
from clipopt_core.serve.shards import index_key, local_index_file, shard_key

BASELINE_PREFIX = "serving-baseline"  # the baseline variant's gallery shards + index (same layout as Keys.serving)


@dataclass(frozen=True)
class Identity:
    """What a loaded (model, index) pair is: shown by ``/info`` and compared to detect a new publication.

    ``info_sha256`` hashes the index's ``info.json`` (rewritten, last, by every index build);
    ``index_sha256`` the index file; ``published_at`` is ``info.json``'s modification time (epoch s).
    """

    prefix: str
    variant: str
    model_key: str
    index_sha256: str
    info_sha256: str
    recall_at_10: float | None
    vectors: int
    published_at: float

    def public(self) -> dict[str, Any]:
        return {"variant": self.variant, "model_key": self.model_key, "index_sha256": self.index_sha256[:16],
                "recall_at_10": self.recall_at_10, "vectors": self.vectors, "published_at": self.published_at,
                "published_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.published_at))}


def info_digest(store: ArtifactStore, prefix: str = Keys.serving) -> str:
    """SHA-256 of ``<prefix>/index/info.json`` (the commit marker of an index build): cheap to poll."""
    return hashlib.sha256(store.read_bytes(index_key(prefix, "info.json"))).hexdigest()


def index_model_keys(store: ArtifactStore, prefix: str, info: dict[str, Any]) -> set[str]:
    """The ``model_key`` of every gallery shard an index was built from (empty for an index that
    was not built from shards, i.e. whose ``info.json`` has no ``num_shards``)."""
    shards = int(info.get("num_shards") or 0)
    keys = set()
    for shard in range(shards):
        sidecar = shard_key(prefix, shard, shards).replace(".parquet", ".json")
        if store.exists(sidecar):
            keys.add(str(store.read_json(sidecar)["model_key"]))
    return keys


@dataclass
class SearchService:
    bundle: ClipBundle
    index: Any
    metadata: pl.DataFrame  # row i ↔ faiss id i: image_id, uri, label, caption, source
    variant: str
    identity: Identity | None = None

    @classmethod
    def from_store(cls, store: ArtifactStore, cache_dir: Path | None = None, *, mmap: bool = True,
                   prefix: str = Keys.serving, variant: str | None = None) -> "SearchService":
        """Load a variant's model, the index under ``prefix`` (validated against its info) and the id table.

        ``variant`` defaults to the champion (:mod:`clipopt_core.serve.champion`; the served index,
        ``prefix=Keys.serving``); the baseline's index lives under :data:`BASELINE_PREFIX`. ``mmap`` maps the index file instead of
        reading it (a remote store's file is downloaded into ``cache_dir/index`` first), so a gallery index
        larger than RAM is searched via the page cache. Raises ``ValueError`` when the index was embedded by
        other weights than the variant's current ones (a retrain in progress), ``FileNotFoundError`` when
        something is unpublished.
        """
        cache = cache_dir or Path(os.environ.get("CLIPOPT_CACHE", Path.home() / ".cache" / "clipopt"))
        keys = {name: index_key(prefix, name) for name in ("info.json", "merged.faiss", "ids.parquet")}
        for key in keys.values():
            if not store.exists(key):
                asset = "faiss_index" if prefix == Keys.serving else "baseline_index"
                raise FileNotFoundError(f"{store.url(key)} is missing; materialise {asset} first")
        requested = variant
        variant, model_key, spec = resolve_served(store, cache, requested)
        info_bytes = store.read_bytes(keys["info.json"])
        info = json.loads(info_bytes)
        built_by = index_model_keys(store, prefix, info)
        if built_by and built_by != {model_key}:
            raise ValueError(f"{store.url(keys['merged.faiss'])} was embedded by {sorted(built_by)} but {variant} is now "
                             f"{model_key} (a retrain is being published); rebuild gallery_embeddings and faiss_index")
        path = local_index_file(store, keys["merged.faiss"], cache / "index")
        try:
            index = index_lib.read_index(path, mmap=mmap, expected_dim=info["dim"], expected_count=info["n"])
        except ValueError as exc:
            raise ValueError(f"{store.url(keys['merged.faiss'])} does not match {store.url(keys['info.json'])}: {exc}; "
                             "rebuild faiss_index") from exc
        metadata = _id_table(store, keys["ids.parquet"])
        if metadata.height != index.ntotal:
            raise ValueError(f"index holds {index.ntotal} vectors but the id table {metadata.height} rows; rebuild faiss_index")
        bundle = load_model(spec(), cache_dir=cache)
        if bundle.embed_dim != index.d:
            raise ValueError(f"{store.url(keys['merged.faiss'])} holds {index.d}-dim vectors but the served model "
                             f"({variant}) embeds in {bundle.embed_dim} dims; rebuild gallery_embeddings and faiss_index")
        if resolve_served(store, cache, requested)[1] != model_key or store.read_bytes(keys["info.json"]) != info_bytes:
            raise ValueError(f"the {variant} model or index under {prefix!r} changed while loading; retry")
        published = store.fs.modified(store.path(keys["info.json"])).timestamp()  # local mtime / S3 LastModified
        identity = Identity(prefix=prefix, variant=variant, model_key=model_key, index_sha256=sha256_file(path),
                            info_sha256=hashlib.sha256(info_bytes).hexdigest(), recall_at_10=info.get("recall_at_10"),
                            vectors=int(index.ntotal), published_at=published)
        return cls(bundle, index, metadata, variant, identity)

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """queries float32 [Q, D] normalised → per query up to k hits {rank, score, image_id, uri, label, caption, source}."""
        scores, ids = index_lib.search(self.index, np.asarray(queries, dtype=np.float32).reshape(len(queries), -1), k)
        answers = []
        for score_row, id_row in zip(scores, ids):
            found = id_row >= 0
            rows = self.metadata[id_row[found].tolist()].to_dicts()  # one gather per query
            answers.append([{"rank": rank, "score": float(score), **row}
                            for rank, (score, row) in enumerate(zip(score_row[found], rows))])
        return answers

    def search_vector(self, query: np.ndarray, k: int) -> list[dict[str, Any]]:
        """query float32 [D] normalised → up to k hits (see :meth:`search_vectors`)."""
        return self.search_vectors(query.reshape(1, -1), k)[0]

    def search_texts(self, texts: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
        """Several text queries in one encoder call and one index search (micro-batching)."""
        return self.search_vectors(embed_texts(self.bundle, list(texts)).numpy(), k)

    def search_text(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        return self.search_texts([text], k)[0]

    def search_image(self, uri: str, k: int = 10) -> list[dict[str, Any]]:
        """An image by path or fsspec URL, embedded exactly as the gallery was (:func:`embed_images`)."""
        return self.search_vector(embed_images(self.bundle, [uri], batch_size=1, num_workers=0)[0].numpy(), k)

    def search_image_bytes(self, data: bytes, k: int = 10, *, max_pixels: int | None = None) -> list[dict[str, Any]]:
        """Uploaded image bytes → hits, after :func:`check_image` (raises ``ImageRejected``)."""
        check_image(data, max_pixels)
        return self.search_images_bytes([data], k)[0]

    def search_images_bytes(self, images: Sequence[bytes], k: int) -> list[list[dict[str, Any]]]:
        """Several checked images (:func:`check_image`) in one :func:`embed_images` call, each from a ``data:``
        URL: the gallery's own decoding and preprocessing, no file written and no URL fetched."""
        uris = ["data:application/octet-stream;base64," + base64.b64encode(data).decode() for data in images]
        return self.search_vectors(embed_images(self.bundle, uris, batch_size=max(1, len(uris)), num_workers=0).numpy(), k)


def check_image(data: bytes, max_pixels: int | None = None) -> None:
    """Raise ``ImageRejected`` (reason: empty, not_an_image, too_large — more than ``max_pixels``, default
    :data:`~clipopt_core.data.images.MAX_PIXELS` —, truncated, too_small) unless ``data`` decodes to an image."""
    decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {}))


def _id_table(store: ArtifactStore, key: str = Keys.index_ids) -> pl.DataFrame:
    """The id table of an index (row i = faiss id i), after checking its columns."""
    url = store.url(key)
    try:
        frame = store.read_parquet(key)
    except Exception as exc:  # polars raises assorted errors on bytes that are not parquet
        raise ValueError(f"{url} is not a readable parquet table ({type(exc).__name__}: {exc}); "
                         "rebuild faiss_index") from exc
    missing = [c for c in ("image_id", "uri") if c not in frame.columns]
    if missing:
        raise ValueError(f"{url} lacks column(s) {missing}; rebuild faiss_index")
    return frame


def lazy_image_embedder(spec: Callable[[], ModelSpec], cache: Path, *, device: str = "cpu",
                        batch_size: int | Literal["auto"] = "auto") -> Callable[[Sequence[str]], np.ndarray]:
    """``uris → float32 [n, D]`` (rows L2-normalised) with the weights ``spec()`` loads, for
    :func:`clipopt_core.serve.shards.embed_shard`. The model loads on the first call, so a run whose shards
    are all current never loads it."""
    bundle: ClipBundle | None = None

    def embed(uris: Sequence[str]) -> np.ndarray:
        nonlocal bundle
        bundle = bundle or load_model(spec(), cache_dir=cache, device=device)
        return embed_images(bundle, uris, batch_size=batch_size, device=device).numpy()

    return embed
