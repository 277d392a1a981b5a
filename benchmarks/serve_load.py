"""Load on ``clipopt serve``: QPS and p50/p99 latency of text and image queries at 1, 8 and 32 clients.

    python benchmarks/serve_load.py                     # the demo's published index if there, else a stand-in
    python benchmarks/serve_load.py --store file:///…   # any published store
    python benchmarks/serve_load.py --smoke             # tiny model, tiny stand-in, 1 s cells

The service runs as its own process (``python -m clipopt_core.cli.main serve``) on 127.0.0.1; the clients
are one asyncio process with keep-alive connections (it shares the machine's cores with the service).
The reference is the same queries through :class:`SearchService` in this process, one after another;
in each cell reference and service take ``--rounds`` turns of equal length (the idle one waits). Every ratio is **ours ÷ reference** in
queries per second (> 1: the service answers more queries per second than the in-process loop).
Without a published index at ``--store``, a stand-in is built: the test suite's drawn shapes
(``--images`` of them) embedded by ``--model`` and indexed with the core functions, served as the baseline.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import _bench  # noqa: F401 - sets OMP_WAIT_POLICY / HF_HUB_OFFLINE before torch
from _bench import ROOT, cache_dir, finish_args, header, parser, ratio_line, shapes_images, table

import httpx
import numpy as np

from clipopt_core.cli.main import default_store_url
from clipopt_core.layout import Keys
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.search import SearchService

TEXTS = [f"a {adjective} {thing}" for adjective in ("red", "green", "blue", "orange", "small", "happy", "yellow", "dark")
         for thing in ("circle", "square", "face", "apple", "cat", "flag", "heart", "star")]


def stand_in(store: ArtifactStore, args, work: Path) -> None:
    """A served index over ``args.images`` drawn shapes embedded by ``args.model`` (the baseline variant)."""
    from clipopt_core.models.loading import ModelSpec
    from tests.serving import publish_base, publish_index, shapes_manifest

    shapes_images(work / "shapes", args.images)
    publish_base(store, shapes_manifest(work / "shapes"), ModelSpec(args.model, image_size=args.image_size))
    publish_index(store, "baseline", cache_dir(), num_shards=2)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50) * 1e3), float(np.percentile(latencies, 99) * 1e3)


def in_process(fn: Callable[[int], object], seconds: float) -> tuple[float, list[float]]:
    """(queries/s, latencies) of ``fn(i)`` called one after another for ``seconds``."""
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        fn(len(latencies))
        latencies.append(time.perf_counter() - t0)
    return len(latencies) / (time.perf_counter() - started), latencies


def alternate(reference: Callable[[], tuple], service: Callable[[], tuple], rounds: int) -> tuple:
    """``rounds`` turns of reference then service; returns (ref QPS, ref latencies, QPS, latencies, failures),
    each QPS the mean over the turns (equal durations)."""
    ref_qps, ref_latencies, qps, latencies, failures = [], [], [], [], 0
    for _ in range(rounds):
        rate, times = reference()
        ref_qps.append(rate)
        ref_latencies += times
        rate, times, failed = service()
        qps.append(rate)
        latencies += times
        failures += failed
    return float(np.mean(ref_qps)), ref_latencies, float(np.mean(qps)), latencies, failures


async def load(base_url: str, clients: int, seconds: float, request: Callable) -> tuple[float, list[float], int]:
    """(queries/s, latencies, failures) of ``clients`` concurrent loops of ``request(client, i)``."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        await request(client, 0)  # connection and first-call warm-up
        deadline = time.perf_counter() + seconds

        async def loop(number: int) -> None:
            nonlocal failures
            i = number
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                response = await request(client, i)
                latencies.append(time.perf_counter() - t0)
                failures += response.status_code != 200
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(loop(n) for n in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, failures


def start_service(store_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPOPT_CACHE": str(cache_dir())}
    env.pop("CLIPOPT_SERVE_TOKEN", None)
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "clipopt_core.cli.main", "serve", "--store", store_url,
                                    "--port", str(port), "--poll-seconds", "3600"], stdout=handle,
                                   stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise SystemExit(f"clipopt serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--store", default=None, help="artifact store with a published index (default: the demo's)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per cell and side (default 9; 1 with --smoke)")
    ap.add_argument("--images", type=int, default=None, help="stand-in gallery size (default 1600; 48 with --smoke)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=None, help="turns of reference and service per cell (default 3)")
    args = finish_args(ap.parse_args())
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    """Reference, load cells, reference again; print the table and the ratio line."""
    seconds = args.seconds or (1.0 if args.smoke else 9.0)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.images = args.images or (48 if args.smoke else 1600)
    clients = [int(c) for c in args.clients.split(",")]
    store_url = args.store or ("" if args.smoke else default_store_url())
    store = ArtifactStore(store_url) if store_url else None
    source = store_url
    if store is None or not store.exists(Keys.index_info):
        store = ArtifactStore(f"file://{work / 'artifacts'}")
        stand_in(store, args, work)
        source = f"stand-in: {store.read_parquet(Keys.manifest).height} drawn shapes, {args.model}"
    service = SearchService.from_store(store, cache_dir())
    gallery = service.metadata["uri"].to_list()
    images = [Path(uri).read_bytes() for uri in gallery[:: max(1, len(gallery) // 32)][:32]]
    header(args, index=source, vectors=service.index.ntotal, seconds=seconds, clients=args.clients)

    queries = {"text": lambda i: service.search_text(TEXTS[i % len(TEXTS)], 10),
               "image": lambda i: service.search_image_bytes(images[i % len(images)], 10)}

    async def text(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/search", params={"text": TEXTS[i % len(TEXTS)], "k": 10})

    async def image(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/search?k=10", content=images[i % len(images)])

    for query in queries.values():  # warm-up of the in-process reference
        for i in range(3):
            query(i)
    process, base_url = start_service(store.base_url, work / "serve.log")
    rows, ratios = [], {}
    try:
        for i in range(3):  # warm-up of the service
            httpx.get(f"{base_url}/search", params={"text": TEXTS[i], "k": 10}, timeout=60)
            httpx.post(f"{base_url}/search?k=10", content=images[i % len(images)], timeout=60)
        for kind, request in (("text", text), ("image", image)):
            for n in clients:  # reference and service take turns: drift of a shared machine hits both
                ref_qps, ref_latencies, qps, latencies, failures = alternate(
                    lambda: in_process(queries[kind], seconds / args.rounds),
                    lambda: asyncio.run(load(base_url, n, seconds / args.rounds, request)), args.rounds)
                rows.append([f"{kind} in-process (reference)", 1, ref_qps, *percentiles(ref_latencies), 1.0, 0])
                rows.append([f"{kind} via HTTP", n, qps, *percentiles(latencies), qps / ref_qps, failures])
                ratios[f"{kind}_{n}"] = qps / ref_qps
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    table(["queries", "clients", "QPS", "p50 ms", "p99 ms", "ours/ref", "failed"], rows)
    ratio_line(**ratios)


if __name__ == "__main__":
    main()
