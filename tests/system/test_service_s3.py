"""The search service over an ``s3://`` artifact store (a real S3 server): load, search, hot swap."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.http import create_app
from clipopt_core.serve.live import LiveIndexes
from tests.serving import publish_all, publish_checkpoint, publish_index

pytestmark = pytest.mark.system


def _get(app, url: str) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(url)

    return asyncio.run(go())


def test_service_loads_searches_and_swaps_over_s3(s3, tmp_path: Path, shapes_source: Path):
    store = ArtifactStore(s3.url(), storage_options=s3.storage_options)
    publish_all(store, shapes_source, tmp_path, served="stage1", noise_seed=1, baseline=False)
    live = LiveIndexes.load(store, tmp_path / "live")
    app = create_app(live)
    first = _get(app, "/search?text=a%20red%20circle&k=5").json()
    assert len(first["hits"]) == 5 and first["model_key"].startswith("stage1:")
    assert _get(app, first["hits"][0]["thumbnail"]).headers["content-type"] == "image/jpeg"
    assert (tmp_path / "live" / "index" / "serving" / "index" / "merged.faiss").exists()  # downloaded, then mapped

    publish_checkpoint(store, "stage1", 2, tmp_path / "v2")
    publish_index(store, "stage1", tmp_path / "v2-cache")
    assert live.poll() == ["served"]
    second = _get(app, "/search?text=a%20red%20circle&k=5").json()
    assert second["model_key"] != first["model_key"] and second["index_sha256"] != first["index_sha256"]
    info = _get(app, "/info").json()["variants"]["served"]
    assert info["model_key"] == second["model_key"] and info["published_at"] > 0
