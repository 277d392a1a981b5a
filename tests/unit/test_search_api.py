"""The search service's HTTP API through httpx's ASGI transport, on small published indexes."""
from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.http import ServeSettings, create_app, redacted
from clipopt_core.serve.live import LiveIndexes
from clipopt_core.serve.search import SearchService
from tests.serving import publish_all

TOKEN = "s3cr3t-token-value-123"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, shapes_source: Path) -> tuple[ArtifactStore, Path]:
    """A store with a served ``stage1`` index and a baseline index over the 48 shapes."""
    root = tmp_path_factory.mktemp("search_api")
    store = ArtifactStore(f"file://{root / 'artifacts'}")
    publish_all(store, shapes_source, root)
    return store, root / "cache"


@pytest.fixture(scope="module")
def live(published) -> LiveIndexes:
    store, cache = published
    return LiveIndexes.load(store, cache)


def call(app, method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


def png(path_or_image: Path | Image.Image) -> bytes:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_search_answers_like_the_in_process_service(live, published):
    app = create_app(live)
    store, cache = published
    reference = SearchService.from_store(store, cache)
    for text in ("a red circle", "a blue cross"):  # a changed query changes the answer
        body = call(app, "GET", "/search", params={"text": text, "k": 7}).json()
        expected = reference.search_text(text, 7)
        assert [h["image_id"] for h in body["hits"]] == [h["image_id"] for h in expected]
        assert [h["score"] for h in body["hits"]] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        assert body["variant"] == "served" and body["model_key"].startswith("stage1:")
        assert set(body["hits"][0]) == {"rank", "score", "image_id", "label", "caption", "source", "thumbnail"}
    assert call(app, "GET", "/search", params={"text": "a red circle"}).json()["hits"] != body["hits"]


def test_thumbnail_is_a_small_jpeg_of_the_hit(live):
    app = create_app(live)
    hit = call(app, "GET", "/search", params={"text": "a green square", "k": 1}).json()["hits"][0]
    response = call(app, "GET", hit["thumbnail"].replace("?", "?size=32&"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and max(image.size) <= 32


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_image_search_finds_the_uploaded_gallery_image_first(live, shapes_source, form):
    app = create_app(live)
    uri = live.get("served").service.metadata.row(5, named=True)
    data = png(Path(uri["uri"]))
    if form == "raw":
        response = call(app, "POST", "/search?k=3", content=data, headers={"content-type": "image/png"})
    else:
        response = call(app, "POST", "/search?k=3", files={"image": ("q.png", data, "image/png")})
    body = response.json()
    assert response.status_code == 200, body
    assert body["hits"][0]["image_id"] == uri["image_id"]
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the gallery's own embedding path


def test_search_image_bytes_embeds_like_the_gallery(live, shapes_source):
    service = live.get("served").service
    row = service.metadata.row(9, named=True)
    from_bytes = service.search_image_bytes(Path(row["uri"]).read_bytes(), 4)
    from_path = service.search_image(row["uri"], 4)
    assert from_bytes == from_path and from_bytes[0]["image_id"] == row["image_id"]


def test_variant_switch_answers_from_the_baseline_pair(live):
    app = create_app(live)
    served = call(app, "GET", "/search", params={"text": "a red circle", "k": 5}).json()
    baseline = call(app, "GET", "/search", params={"text": "a red circle", "k": 5, "variant": "baseline"}).json()
    assert baseline["variant"] == "baseline" and baseline["model_key"].startswith("baseline:")
    assert baseline["index_sha256"] != served["index_sha256"]
    assert [h["score"] for h in baseline["hits"]] != [h["score"] for h in served["hits"]]
    info = call(app, "GET", "/info").json()["variants"]
    assert info["served"]["vectors"] == info["baseline"]["vectors"] == 48
    assert info["served"]["model_key"] == served["model_key"] and info["served"]["recall_at_10"] == 1.0
    assert info["served"]["published_iso"].endswith("Z")


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # 81 M pixels in a few kB
    return buffer.getvalue()


BAD_REQUESTS = {
    "empty_text": (("GET", "/search?text="), 400, "empty query"),
    "blank_text": (("GET", "/search?text=%20%20"), 400, "empty query"),
    "k_zero": (("GET", "/search?text=a&k=0"), 400, "k must be in [1, 100]"),
    "k_too_big": (("GET", "/search?text=a&k=101"), 400, "k must be in [1, 100]"),
    "k_not_int": (("GET", "/search?text=a&k=ten"), 400, "k: "),
    "long_text": (("GET", "/search?text=" + "a" * 1001), 400, "at most 1000"),
    "unknown_variant": (("GET", "/search?text=a&variant=mcip9"), 400, "unknown variant 'mcip9'"),
    "not_an_image": (("POST", "/search", {"content": b"%PDF-1.4 not an image"}), 415, "not_an_image"),
    "bomb": (("POST", "/search", {"content": _bomb()}), 413, "too_large"),
    "empty_upload": (("POST", "/search", {"content": b""}), 400, "empty upload"),
    "truncated": (("POST", "/search", {"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}), 415, "not_an_image"),
    "form_without_image": (("POST", "/search", {"files": {"photo": ("a.png", b"x", "image/png")}}), 400,
                           "field named 'image'"),
    "thumbnail_unknown": (("GET", "/items/ffffffffffffffffffff/thumbnail"), 404, "no gallery image"),
    "thumbnail_traversal": (("GET", "/items/..%2F..%2Fetc%2Fpasswd/thumbnail"), 404, ""),
    "thumbnail_size": (("GET", "/items/abc/thumbnail?size=4000"), 400, "size must be in"),
    "image_k_out_of_range": (("POST", "/search?k=1000", {"content": b"x"}), 400, "k must be in"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_input_is_a_clear_4xx(live, name):
    (method, url, *options), status, message = BAD_REQUESTS[name]
    response = call(create_app(live), method, url, **(options[0] if options else {}))
    assert response.status_code == status, response.text
    assert message in response.json().get("detail", "")


def test_oversized_upload_is_refused_at_the_configured_limit(live, shapes_source):
    data = png(next(shapes_source.rglob("*.png")))
    small = create_app(live, ServeSettings(max_upload_bytes=len(data) - 1))
    assert call(small, "POST", "/search", content=data).status_code == 413
    assert "exceeds the limit" in call(small, "POST", "/search", files={"image": ("q.png", data)}).json()["detail"]
    assert call(create_app(live, ServeSettings(max_upload_bytes=len(data) + 1)), "POST", "/search",
                content=data).status_code == 200


def test_unpublished_baseline_is_a_404(published, tmp_path):
    store, cache = published
    live = LiveIndexes.load(store, cache)
    live.pairs = {"served": live.pairs["served"]}  # as if baseline_index were never materialised
    response = call(create_app(live), "GET", "/search?text=a&variant=baseline")
    assert response.status_code == 404 and "materialise baseline_index" in response.json()["detail"]


def test_bearer_token_guards_everything_but_the_page_and_health(live, caplog):
    caplog.set_level(logging.DEBUG)
    app = create_app(live, ServeSettings(token=TOKEN))
    for url in ("/search?text=a", "/info", "/items/x/thumbnail"):
        assert call(app, "GET", url).status_code == 401
        assert call(app, "GET", url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert call(app, "GET", "/search?text=a", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert call(app, "POST", "/search", content=b"x", headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert call(app, "GET", "/healthz").json()["status"] == "ok"
    assert "<title>clipopt search</title>" in call(app, "GET", "/").text
    assert call(app, "GET", "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["auth"] is True
    assert TOKEN not in caplog.text


def test_cors_is_off_unless_origins_are_configured(live):
    headers = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"}
    closed = call(create_app(live), "GET", "/search?text=a", headers=headers)
    assert "access-control-allow-origin" not in closed.headers
    opened = call(create_app(live, ServeSettings(cors_origins=("https://elsewhere.example",))), "GET",
                  "/search?text=a", headers=headers)
    assert opened.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_concurrent_queries_are_batched_and_answered_each_on_their_own(live, published):
    app = create_app(live)
    texts = [f"a {colour} {shape}" for colour in ("red", "green", "blue", "orange")
             for shape in ("circle", "square", "triangle", "cross")]
    service = live.get("served").service
    rows = [service.metadata.row(i, named=True) for i in range(0, 48, 6)]

    async def go() -> tuple[list[dict], list[dict]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            text_replies = [client.get("/search", params={"text": t, "k": 2 + i % 3}) for i, t in enumerate(texts)]
            image_replies = [client.post("/search?k=2", content=Path(row["uri"]).read_bytes()) for row in rows]
            replies = await asyncio.gather(*text_replies, *image_replies)
        return [r.json() for r in replies[:len(texts)]], [r.json() for r in replies[len(texts):]]

    text_bodies, image_bodies = asyncio.run(go())
    for i, (text, body) in enumerate(zip(texts, text_bodies)):
        assert [h["image_id"] for h in body["hits"]] == [h["image_id"] for h in service.search_text(text, 2 + i % 3)]
    for row, body in zip(rows, image_bodies):
        assert body["hits"][0]["image_id"] == row["image_id"]
        assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert max(app.state.batcher.batches) > 1 and sum(app.state.batcher.batches) == len(texts) + len(rows)


def test_redacted_hides_user_info():
    assert redacted("s3://KEY:SECRET@bucket/prefix") == "s3://***@bucket/prefix"
    assert redacted("file:///data/artifacts") == "file:///data/artifacts"


def test_serve_command_refuses_a_store_without_an_index(tmp_path, capsys):
    from clipopt_core.cli.main import main

    assert main(["serve", "--store", f"file://{tmp_path / 'empty'}", "--port", "1"]) == 2
    assert "materialise faiss_index first" in capsys.readouterr().err
