"""Hostile files: a code-executing pickle as base weights, and a served index / table that do not fit.

tests/unit/test_models.py already proves ``load_model`` refuses a code-executing pickle
(``test_code_executing_pickle_is_refused``); here the same file goes through the ``base_model``
asset. The serving checks build a small served store by hand (baseline variant, tiny model).
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest
import torch

from clipopt_core.serve import index as index_lib
from clipopt_core.layout import Keys
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.serve.search import SearchService
from clipopt_core.runtime.storage import ArtifactStore
from tests.reliability.conftest import failure_text, materialize

COUNT, DIM = 10, 32  # the tiny model embeds in 32 dims


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_code_executing_pickle_through_the_base_model_asset_is_refused(tmp_path: Path):
    tiny = load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path / "cache")
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "evil.pt"
    torch.save({"state_dict": {**tiny.model.state_dict(), "evil": _Payload(marker)}}, weights)
    result = materialize(("base_model",), tmp_path, tmp_path,
                         ops={"base_model": {"config": {"name": "clipopt-tiny", "pretrained": str(weights)}}})
    assert not result.success
    assert "cannot load model" in failure_text(result)
    assert not marker.exists(), "the pickle's code ran"
    assert not ArtifactStore(f"file://{tmp_path / 'artifacts'}").exists(Keys.base_model)


# ------------------------------------------------------------------ SearchService.from_store

def _vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.RandomState(seed).randn(count, dim).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _index_bytes(count: int, dim: int) -> bytes:
    index = faiss.IndexFlatIP(dim)
    index.add(_vectors(count, dim))
    return index_lib.serialize_index(index)


def _table(count: int) -> pl.DataFrame:
    return pl.DataFrame({"image_id": [f"id{n}" for n in range(count)], "uri": [f"/img/{n}.png" for n in range(count)],
                         "label": ["x"] * count, "caption": [None] * count, "source": ["s"] * count})


def served_store(root: Path, count: int = COUNT, dim: int = DIM) -> ArtifactStore:
    """What faiss_index leaves behind for the baseline variant of the tiny model."""
    store = ArtifactStore(f"file://{root}")
    store.write_json(Keys.base_model, {"spec": {"name": "clipopt-tiny", "pretrained": None, "image_size": None}})
    store.write_json(Keys.report_json, {"serve_variant": "baseline"})
    store.write_parquet(Keys.index_ids, _table(count))
    store.write_bytes(Keys.index, _index_bytes(count, dim))
    store.write_json(Keys.index_info, {"dim": dim, "n": count, "kind": "flat"})
    return store


def test_consistent_store_serves(tmp_path: Path):
    service = SearchService.from_store(served_store(tmp_path / "store"), cache_dir=tmp_path / "cache")
    hits = service.search_text("a red circle", k=3)
    assert [hit["rank"] for hit in hits] == [0, 1, 2]


CORRUPTIONS: dict[str, tuple[Callable[[ArtifactStore], object], str]] = {
    "index_other_dim": (lambda s: s.write_bytes(Keys.index, _index_bytes(COUNT, 16)),
                        "index dimension mismatch: expected 32, found 16"),
    "index_other_count": (lambda s: s.write_bytes(Keys.index, _index_bytes(COUNT - 1, DIM)),
                          "index vector count mismatch: expected 10, found 9"),
    "index_garbage": (lambda s: s.write_bytes(Keys.index, b"IxFI" + b"\xff" * 300), "could not read faiss index file"),
    "index_garbage_ivf": (lambda s: s.write_bytes(Keys.index, b"IwFl" + b"\xff" * 300), "could not read faiss index file"),
    "index_truncated": (lambda s: s.write_bytes(Keys.index, _index_bytes(COUNT, DIM)[:700]),
                        "could not read faiss index file"),
    "info_other_count": (lambda s: s.write_json(Keys.index_info, {"dim": DIM, "n": COUNT + 1, "kind": "flat"}),
                         "index vector count mismatch: expected 11, found 10"),
    "table_extra_rows": (lambda s: s.write_parquet(Keys.index_ids, _table(COUNT + 1)),
                         "index holds 10 vectors but the id table 11 rows"),
    "table_not_parquet": (lambda s: s.write_bytes(Keys.index_ids, b"PAR1 not really"), "is not a readable parquet table"),
    "table_missing_column": (lambda s: s.write_parquet(Keys.index_ids, _table(COUNT).drop("uri")),
                             "lacks column(s) ['uri']"),
    "everything_64_dim_model_32": (lambda s: served_store(Path(s.root), dim=64),
                                   "holds 64-dim vectors but the served model (baseline) embeds in 32 dims"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_inconsistent_served_artifacts_are_refused(tmp_path: Path, name: str):
    store = served_store(tmp_path / "store")
    corrupt, message = CORRUPTIONS[name]
    corrupt(store)
    with pytest.raises(ValueError) as info:
        SearchService.from_store(store, cache_dir=tmp_path / "cache")
    assert message in str(info.value)
    assert "rebuild" in str(info.value)  # says what to do


def test_missing_index_info_says_what_to_materialise(tmp_path: Path):
    store = served_store(tmp_path / "store")
    os.remove(store.path(Keys.index_info))
    with pytest.raises(FileNotFoundError, match="materialise faiss_index first"):
        SearchService.from_store(store, cache_dir=tmp_path / "cache")
