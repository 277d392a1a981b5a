"""Hot swap: a retrain published while queries stream in is picked up with no failed request and no
request answered by one model over the other model's index."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from clipopt_core.layout import Keys
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.http import create_app
from clipopt_core.serve.live import LiveIndexes
from clipopt_core.serve.search import SearchService
from tests.serving import publish_all, publish_checkpoint, publish_index

TEXTS = ("a red circle", "a blue square", "a green cross", "an orange triangle")
CLIENTS = 4


@pytest.fixture
def store(tmp_path: Path, shapes_source: Path) -> ArtifactStore:
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    publish_all(store, shapes_source, tmp_path, served="stage1", noise_seed=1, baseline=False)
    return store


def _stream(app, stop: threading.Event, after_stop: int) -> list[tuple[str, int, httpx.Response]]:
    """``CLIENTS`` clients querying in a loop until ``stop`` is set, then ``after_stop`` more each."""
    async def client_loop(client: httpx.AsyncClient, number: int) -> list[tuple[str, int, httpx.Response]]:
        replies, extra, turn = [], 0, number
        while extra < after_stop:
            text, k = TEXTS[turn % len(TEXTS)], 3 + turn % 4
            replies.append((text, k, await client.get("/search", params={"text": text, "k": k})))
            turn += 1
            extra += stop.is_set()
            await asyncio.sleep(0)
        return replies

    async def go() -> list[tuple[str, int, httpx.Response]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            results = await asyncio.gather(*(client_loop(client, n) for n in range(CLIENTS)))
        return [reply for replies in results for reply in replies]

    return asyncio.run(go())


def test_retrain_published_during_a_query_stream_swaps_without_failures_or_mixing(store, tmp_path):
    old = SearchService.from_store(store, tmp_path / "ref-old")
    live = LiveIndexes.load(store, tmp_path / "live")
    app = create_app(live)
    swapped = threading.Event()

    def retrain() -> None:
        publish_checkpoint(store, "stage1", 2, tmp_path / "v2")  # new weights first, the index last
        publish_index(store, "stage1", tmp_path / "v2-cache")
        while not live.swaps:
            threading.Event().wait(0.02)
        swapped.set()

    live.start(0.02)
    publisher = threading.Thread(target=retrain)
    publisher.start()
    try:
        replies = _stream(app, swapped, after_stop=5)
    finally:
        publisher.join()
        live.stop()
    new = SearchService.from_store(store, tmp_path / "ref-new")
    references = {old.identity.model_key: old, new.identity.model_key: new}
    assert len(references) == 2 and live.swaps == 1
    assert all(response.status_code == 200 for *_, response in replies)
    seen = set()
    for text, k, response in replies:
        body = response.json()
        reference = references[body["model_key"]]
        assert body["index_sha256"] == reference.identity.index_sha256[:16]
        expected = reference.search_text(text, k)
        assert [h["image_id"] for h in body["hits"]] == [h["image_id"] for h in expected]
        assert [h["score"] for h in body["hits"]] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        seen.add(body["model_key"])
    assert seen == set(references), "the stream saw both the old and the new pair"
    assert replies[-1][2].json()["model_key"] == new.identity.model_key


def test_a_half_published_retrain_keeps_the_old_pair(store, tmp_path):
    live = LiveIndexes.load(store, tmp_path / "live")
    before = live.get("served")
    publish_checkpoint(store, "stage1", 3, tmp_path / "v3")  # new weights, index not rebuilt yet
    assert live.poll() == []  # info.json unchanged: nothing to do
    store.write_json(Keys.index_info, {**store.read_json(Keys.index_info), "rewritten": True})
    assert live.poll() == []
    assert live.get("served") is before
    assert "a retrain is being published" in live.last_error
    with pytest.raises(ValueError, match="rebuild gallery_embeddings and faiss_index"):
        SearchService.from_store(store, tmp_path / "direct")


def test_in_flight_request_finishes_on_the_pair_it_started_with(store, tmp_path):
    live = LiveIndexes.load(store, tmp_path / "live")
    app = create_app(live)
    old_key = live.get("served").service.identity.model_key

    async def go() -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            pending = asyncio.create_task(client.get("/search", params={"text": "a red circle", "k": 3}))
            while not app.state.batcher.batches:  # until the request's batch is being embedded
                await asyncio.sleep(0)
            publish_checkpoint(store, "stage1", 4, tmp_path / "v4")
            publish_index(store, "stage1", tmp_path / "v4-cache")
            assert live.poll() == ["served"]
            return (await pending).json()

    body = asyncio.run(go())
    assert live.get("served").service.identity.model_key != old_key
    assert body["model_key"] == old_key
