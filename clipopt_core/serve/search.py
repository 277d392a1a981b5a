"""Search the served index: one embedding per image answers image and text queries."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import polars as pl

from clipopt_core.serve import index as index_lib
from clipopt_core.data.datasets import eval_transform, load_image
from clipopt_core.models.encode import embed_images, embed_texts
from clipopt_core.layout import Keys, variant_spec
from clipopt_core.models.loading import ClipBundle, load_model
from clipopt_core.serve.shards import local_index_file
from clipopt_core.runtime.storage import ArtifactStore


@dataclass
class SearchService:
    bundle: ClipBundle
    index: Any
    metadata: pl.DataFrame  # row i ↔ faiss id i: image_id, uri, label, caption, source
    variant: str

    @classmethod
    def from_store(cls, store: ArtifactStore, cache_dir: Path | None = None, *, mmap: bool = True) -> "SearchService":
        """Load the served variant's model, the index (validated against its info) and the id table.

        ``mmap`` maps the index file instead of reading it (a remote store's file is downloaded into
        ``cache_dir/index`` first), so a gallery index larger than RAM is searched via the page cache.
        """
        cache = cache_dir or Path(os.environ.get("CLIPOPT_CACHE", Path.home() / ".cache" / "clipopt"))
        for key in (Keys.report_json, Keys.index_info, Keys.index, Keys.index_ids):
            if not store.exists(key):
                raise FileNotFoundError(f"{store.url(key)} is missing; materialise faiss_index first")
        variant = store.read_json(Keys.report_json)["serve_variant"]
        info = store.read_json(Keys.index_info)
        try:
            index = index_lib.read_index(local_index_file(store, Keys.index, cache / "index"), mmap=mmap,
                                         expected_dim=info["dim"], expected_count=info["n"])
        except ValueError as exc:
            raise ValueError(f"{store.url(Keys.index)} does not match {store.url(Keys.index_info)}: {exc}; "
                             "rebuild faiss_index") from exc
        metadata = _id_table(store)
        if metadata.height != index.ntotal:
            raise ValueError(f"index holds {index.ntotal} vectors but the id table {metadata.height} rows; rebuild faiss_index")
        bundle = load_model(variant_spec(store, variant, cache), cache_dir=cache)
        if bundle.embed_dim != index.d:
            raise ValueError(f"{store.url(Keys.index)} holds {index.d}-dim vectors but the served model "
                             f"({variant}) embeds in {bundle.embed_dim} dims; rebuild gallery_embeddings and faiss_index")
        return cls(bundle, index, metadata, variant)

    def search_vector(self, query: np.ndarray, k: int) -> list[dict[str, Any]]:
        """query float32 [D] normalised → up to k hits {rank, score, image_id, uri, label, caption, source}."""
        scores, ids = index_lib.search(self.index, query.reshape(1, -1).astype(np.float32), k)
        return [{"rank": rank, "score": float(score), **self.metadata.row(int(row), named=True)}
                for rank, (score, row) in enumerate(zip(scores[0], ids[0])) if row >= 0]

    def search_text(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        return self.search_vector(embed_texts(self.bundle, [text])[0].numpy(), k)

    def search_image(self, uri: str, k: int = 10) -> list[dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        transform = eval_transform(self.bundle.image_size, self.bundle.mean, self.bundle.std, self.bundle.interpolation)
        with torch.inference_mode():
            vector = F.normalize(self.bundle.model.encode_image(transform(load_image(uri)).unsqueeze(0)).float(), dim=-1)
        return self.search_vector(vector[0].numpy(), k)


def _id_table(store: ArtifactStore) -> pl.DataFrame:
    """The id table of the served index (row i = faiss id i), after checking its columns."""
    url = store.url(Keys.index_ids)
    try:
        frame = store.read_parquet(Keys.index_ids)
    except Exception as exc:  # polars raises assorted errors on bytes that are not parquet
        raise ValueError(f"{url} is not a readable parquet table ({type(exc).__name__}: {exc}); "
                         "rebuild faiss_index") from exc
    missing = [c for c in ("image_id", "uri") if c not in frame.columns]
    if missing:
        raise ValueError(f"{url} lacks column(s) {missing}; rebuild faiss_index")
    return frame


def lazy_image_embedder(store: ArtifactStore, variant: str, cache: Path, *, device: str = "cpu",
                        batch_size: int | Literal["auto"] = "auto") -> Callable[[Sequence[str]], np.ndarray]:
    """``uris → float32 [n, D]`` (rows L2-normalised) with the weights of report ``variant``, for
    :func:`clipopt_core.serve.shards.embed_shard`. The model loads on the first call, so a run whose shards
    are all current never loads it."""
    bundle: ClipBundle | None = None

    def embed(uris: Sequence[str]) -> np.ndarray:
        nonlocal bundle
        bundle = bundle or load_model(variant_spec(store, variant, cache), cache_dir=cache, device=device)
        return embed_images(bundle, uris, batch_size=batch_size, device=device).numpy()

    return embed
