"""HTTP API and web page over the published indexes (FastAPI; ``clipopt serve`` runs it on uvicorn).

Endpoints (JSON errors are ``{"detail": "…"}`` with a 4xx status that names the problem):

- ``GET /`` the search page (``static/index.html``); ``GET /healthz`` liveness (never needs the token).
- ``GET /info`` identity of each loaded pair: variant, model key, index hash, recall@10, vectors, published time.
- ``GET /search?text=…&k=10&variant=served`` and ``POST /search?k=10&variant=served`` with an image as the
  raw body or as the multipart field ``image`` (a URL in the body is never fetched). Both answer
  ``{variant, model_key, index_sha256, hits: [{rank, score, image_id, label, caption, source, thumbnail}]}``.
- ``GET /items/{image_id}/thumbnail?variant=served&size=192`` a JPEG of a gallery image. Only URIs of the
  pair's id table are ever opened; the request names an id, never a path.

With ``token`` set (``CLIPOPT_SERVE_TOKEN``) every endpoint but ``/`` and ``/healthz`` needs
``Authorization: Bearer <token>``. CORS headers are sent only for the configured origins (none by default).
"""
from __future__ import annotations

import hmac
import io
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser

from clipopt_core.data.images import MAX_PIXELS, ImageRejected, decode_image, read_uri_bytes
from clipopt_core.serve.live import PREFIXES, LiveIndexes, Pair, QueryBatcher
from clipopt_core.serve.search import check_image

log = logging.getLogger("clipopt.serve")
IMAGE_ID = re.compile(r"^[0-9A-Za-z_.-]{1,128}$")
REJECTED_STATUS = {"too_large": 413, "not_an_image": 415, "empty": 400, "truncated": 400, "too_small": 400,
                   "svg_render_failed": 415}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches of the service (``clipopt serve`` flags / ``CLIPOPT_SERVE_*`` variables)."""

    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = MAX_PIXELS
    max_k: int = 100
    max_text_chars: int = 1000
    max_batch: int = 32
    thumbnail_sizes: tuple[int, int] = (32, 512)
    extra: dict[str, Any] = field(default_factory=dict)  # shown by /info (e.g. the store URL, redacted)


def create_app(live: LiveIndexes, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app over ``live`` (its watcher is started and stopped by the caller)."""
    app = FastAPI(title="clipopt search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.live, app.state.batcher, app.state.settings = live, QueryBatcher(settings.max_batch), settings
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_exception_handler(RequestValidationError, _invalid)
    app.include_router(router)
    return app


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A query parameter of the wrong type (``k=ten``): 400 naming the parameter."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"detail": problems}, status_code=400)


async def _authorised(request: Request) -> None:
    """401 unless the request carries the configured bearer token (async: no thread hop per request)."""
    token = request.app.state.settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <CLIPOPT_SERVE_TOKEN>)",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()
guarded = APIRouter(dependencies=[Depends(_authorised)])


def _pair(request: Request, variant: str) -> Pair:
    """The variant's current pair, taken once: the whole request runs on it."""
    if variant not in PREFIXES:
        raise HTTPException(400, f"unknown variant {variant!r}; one of {', '.join(PREFIXES)}")
    pair = request.app.state.live.get(variant)
    if pair is None:
        raise HTTPException(404, f"the {variant} index is not published; materialise baseline_index")
    return pair


def _k(request: Request, k: int) -> int:
    top = request.app.state.settings.max_k
    if not 1 <= k <= top:
        raise HTTPException(400, f"k must be in [1, {top}], got {k}")
    return k


def _answer(pair: Pair, variant: str, hits: list[dict[str, Any]]) -> JSONResponse:
    """The JSON answer, rendered directly (no response-model validation on the hot path)."""
    identity = pair.service.identity
    return JSONResponse({
        "variant": variant, "model_key": identity.model_key, "index_sha256": identity.index_sha256[:16],
        "hits": [{"rank": h["rank"], "score": h["score"], "image_id": h["image_id"], "label": h.get("label"),
                  "caption": h.get("caption"), "source": h.get("source"),
                  "thumbnail": f"/items/{h['image_id']}/thumbnail?variant={variant}"} for h in hits]})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("clipopt_core.serve").joinpath("static/index.html").read_text())


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    return {"status": "ok", "variants": sorted(request.app.state.live.pairs)}


@guarded.get("/info")
async def info(request: Request) -> dict[str, Any]:
    live, settings = request.app.state.live, request.app.state.settings
    return {"variants": {name: (pair.service.identity.public() if (pair := live.get(name)) else None)
                         for name in PREFIXES},
            "swaps": live.swaps, "last_error": live.last_error,
            "batch_mean": _mean(request.app.state.batcher.batches),
            "limits": {"max_k": settings.max_k, "max_upload_bytes": settings.max_upload_bytes,
                       "max_text_chars": settings.max_text_chars},
            "auth": settings.token is not None, **settings.extra}


@guarded.get("/search")
async def search_text(request: Request, text: str = "", k: int = 10, variant: str = "served") -> JSONResponse:
    limit = request.app.state.settings.max_text_chars
    if not text.strip():
        raise HTTPException(400, "empty query: pass ?text=… (or POST an image)")
    if len(text) > limit:
        raise HTTPException(400, f"text is {len(text)} characters; at most {limit}")
    pair = _pair(request, variant)
    hits = await request.app.state.batcher.search(pair.service, "text", text.strip(), _k(request, k))
    return _answer(pair, variant, hits)


@guarded.post("/search")
async def search_image(request: Request, k: int = 10, variant: str = "served") -> JSONResponse:
    settings = request.app.state.settings
    k, pair = _k(request, k), _pair(request, variant)
    data = await _upload(request, settings.max_upload_bytes)
    try:
        await run_in_threadpool(check_image, data, settings.max_pixels)  # a bad upload never joins a batch
    except ImageRejected as exc:
        raise HTTPException(REJECTED_STATUS.get(exc.reason, 400), f"not a usable image ({exc.reason}): {exc}") from exc
    hits = await request.app.state.batcher.search(pair.service, "image", data, k)
    return _answer(pair, variant, hits)


@guarded.get("/items/{image_id}/thumbnail")
async def thumbnail(request: Request, image_id: str, variant: str = "served", size: int = 192) -> Response:
    low, high = request.app.state.settings.thumbnail_sizes
    if not low <= size <= high:
        raise HTTPException(400, f"size must be in [{low}, {high}], got {size}")
    uri = _pair(request, variant).uri_of.get(image_id) if IMAGE_ID.match(image_id) else None
    if uri is None:
        raise HTTPException(404, f"no gallery image {image_id!r} in the {variant} index")
    try:
        body = await run_in_threadpool(_thumbnail, uri, size)
    except (OSError, ImageRejected) as exc:
        log.warning("thumbnail of %s failed: %s", image_id, type(exc).__name__)
        raise HTTPException(404, f"gallery image {image_id!r} cannot be read") from exc
    return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


router.include_router(guarded)


def _mean(values: list[int]) -> float | None:
    """Mean size of the recent batches (≤ 100), ``None`` before the first."""
    return sum(values) / len(values) if values else None


def redacted(url: str) -> str:
    """``url`` without user info (``s3://key:secret@bucket`` → ``s3://***@bucket``), for logs and ``/info``."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1***@", url)


async def _upload(request: Request, limit: int) -> bytes:
    """The uploaded image: the raw body, or the ``image`` field of a multipart form; 413 past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def once() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=4).parse()
        except Exception as exc:  # noqa: BLE001 - starlette raises MultiPartException and assorted errors
            raise HTTPException(400, f"malformed multipart form: {exc}") from exc
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "the multipart form needs a file field named 'image'")
        body = await upload.read()
    if not body:
        raise HTTPException(400, "empty upload: send an image as the body or as the form field 'image'")
    return body


@lru_cache(maxsize=4096)
def _thumbnail(uri: str, size: int) -> bytes:
    """JPEG bytes of the image at ``uri`` (a gallery URI), fitted into ``size``×``size`` px."""
    image = decode_image(read_uri_bytes(uri), name=uri)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
