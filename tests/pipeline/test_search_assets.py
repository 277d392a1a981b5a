"""The search service's Dagster side: ``baseline_index`` publishes the page's baseline variant, and
``faiss_index`` shows the service URL when ``CLIPOPT_SERVE_URL`` is set."""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.live import LiveIndexes
from clipopt_dagster.assets_search import baseline_index
from clipopt_dagster.assets_serving import faiss_index
from clipopt_dagster.partitions import SHARD_COUNT
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource
from tests.serving import publish_base, publish_index, shapes_manifest


def _resources(tmp_path: Path) -> dict:
    return {"store": ArtifactStoreResource(base_url=f"file://{tmp_path / 'artifacts'}"),
            "compute": ComputeResource(cache_dir=str(tmp_path / "cache"), torch_threads=1)}


def test_baseline_index_becomes_the_pages_baseline_variant(tmp_path: Path, shapes_source: Path):
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    publish_base(store, shapes_manifest(shapes_source))
    publish_index(store, "baseline", tmp_path / "cache", num_shards=SHARD_COUNT)  # the served index
    result = dg.materialize([baseline_index], resources=_resources(tmp_path))
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["n"].value == 48 and metadata["embedded_shards"].value == SHARD_COUNT
    live = LiveIndexes.load(store, tmp_path / "cache")
    baseline = live.get("baseline").service
    assert baseline.identity.vectors == 48 and baseline.identity.model_key.startswith("baseline:")
    again = dg.materialize([baseline_index], resources=_resources(tmp_path))
    assert again.get_asset_materialization_events()[0].materialization.metadata["embedded_shards"].value == 0


def test_faiss_index_metadata_shows_the_service_url(tmp_path: Path, shapes_source: Path, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    publish_base(store, shapes_manifest(shapes_source))
    publish_index(store, "baseline", tmp_path / "cache", num_shards=SHARD_COUNT)
    without = dg.materialize([faiss_index], resources=_resources(tmp_path))
    assert "service" not in without.get_asset_materialization_events()[0].materialization.metadata
    monkeypatch.setenv("CLIPOPT_SERVE_URL", "http://search.internal:8000/")
    result = dg.materialize([faiss_index], resources=_resources(tmp_path))
    assert result.get_asset_materialization_events()[0].materialization.metadata["service"].value == \
        "http://search.internal:8000/"
