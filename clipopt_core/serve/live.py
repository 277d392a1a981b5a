"""The live (model, index) pairs of the search service: hot swap on publication, and micro-batching.

Hot swap. :class:`LiveIndexes` holds one :class:`~clipopt_core.serve.search.SearchService` per variant
(``served``: the report's served variant under ``serving/``; ``baseline`` under
:data:`~clipopt_core.serve.search.BASELINE_PREFIX`, when published). A watcher thread polls each index's
``info.json`` (written last by every build, so it is the commit marker). When its hash changes, a new
service is loaded *beside* the old one and, once it is fully loaded and checked, replaces it by a single
reference assignment. A request takes the reference once, at its start, and uses nothing else, so it
finishes on the pair it started with and never pairs one model with another index. A publication that
does not load (a retrain half-published: new weights, old index) keeps the old pair and is retried at
the next poll.

Micro-batching. :class:`QueryBatcher` queues text and image queries; one worker embeds everything queued
so far in one encoder call per service and kind (queries stay with the pair they captured) and searches
the index once.
When fewer queries are waiting than the last batch held, it waits up to ``max_wait_s`` (4 ms) for the
others, so a steady stream of N clients is answered in one call instead of alternating part-batches.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clipopt_core.layout import Keys
from clipopt_core.runtime.storage import ArtifactStore, StorageError
from clipopt_core.serve.search import BASELINE_PREFIX, SearchService, info_digest

log = logging.getLogger("clipopt.serve")
PREFIXES = {"served": Keys.serving, "baseline": BASELINE_PREFIX}
BATCH_CALLS = {"text": SearchService.search_texts, "image": SearchService.search_images_bytes}


@dataclass(frozen=True)
class Pair:
    """One loaded service and its image-id → URI table (the only URIs thumbnails may open)."""

    service: SearchService
    uri_of: dict[str, str]

    @classmethod
    def of(cls, service: SearchService) -> "Pair":
        frame = service.metadata
        return cls(service, dict(zip(frame["image_id"].to_list(), frame["uri"].to_list())))


@dataclass
class LiveIndexes:
    """The current :class:`Pair` of each variant name, swapped atomically by :meth:`poll`."""

    store: ArtifactStore
    cache_dir: Path | None = None
    mmap: bool = True
    pairs: dict[str, Pair] = field(default_factory=dict)
    swaps: int = 0
    last_error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def load(cls, store: ArtifactStore, cache_dir: Path | None = None, *, mmap: bool = True) -> "LiveIndexes":
        """Load the served pair (required: errors propagate) and the baseline pair (when published)."""
        live = cls(store, cache_dir, mmap)
        live.pairs["served"] = Pair.of(live._load("served"))
        live.poll(names=("baseline",))
        return live

    def get(self, name: str) -> Pair | None:
        return self.pairs.get(name)

    def _load(self, name: str) -> SearchService:
        variant = "baseline" if name == "baseline" else None
        return SearchService.from_store(self.store, self.cache_dir, mmap=self.mmap, prefix=PREFIXES[name],
                                        variant=variant)

    def poll(self, names: tuple[str, ...] = tuple(PREFIXES)) -> list[str]:
        """Reload every variant whose ``info.json`` changed; returns the names swapped."""
        swapped = []
        for name in names:
            current = self.pairs.get(name)
            try:
                digest = info_digest(self.store, PREFIXES[name])
            except (StorageError, FileNotFoundError):
                continue  # not published (yet): keep what is served
            if current is not None and current.service.identity.info_sha256 == digest:
                continue
            try:
                pair = Pair.of(self._load(name))
            except Exception as exc:  # noqa: BLE001 - a bad publication must not stop serving the old pair
                self.last_error = f"{name}: {type(exc).__name__}: {exc}"
                log.warning("keeping the current %s index: %s", name, self.last_error)
                continue
            self.pairs = {**self.pairs, name: pair}  # one reference assignment: readers see old or new
            self.swaps += 1
            self.last_error = None
            swapped.append(name)
            log.info("now serving %s: %s", name, pair.service.identity.public())
        return swapped

    def start(self, interval_s: float) -> None:
        """Poll every ``interval_s`` seconds in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.poll()

        self._thread = threading.Thread(target=run, name="clipopt-index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class QueryBatcher:
    """Answer concurrent queries with one encoder call per (service, kind) in a batch of at most ``max_batch``,
    on one model thread. Kinds: ``text`` (a string, :meth:`SearchService.search_texts`) and ``image`` (bytes
    already checked by :func:`~clipopt_core.serve.search.check_image`, :meth:`SearchService.search_images_bytes`)."""

    def __init__(self, max_batch: int = 32, max_wait_s: float = 0.004) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="clipopt-model")
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches: list[int] = []  # sizes of the last batches (bounded), for /info and tests

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the one model thread: every encoder call of the service runs there, so
        torch keeps one intra-op thread pool instead of one per request thread competing for the cores."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread,
                                                                functools.partial(fn, *args, **kwargs))

    async def search(self, service: SearchService, kind: str, query: str | bytes, k: int) -> list[dict[str, Any]]:
        """Up to ``k`` hits for one query, answered in the next batch of ``service`` and ``kind``."""
        if kind not in BATCH_CALLS:
            raise ValueError(f"kind must be one of {sorted(BATCH_CALLS)}, got {kind!r}")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests): a queue and worker of its own
            self._loop, self._queue = loop, asyncio.Queue()
            loop.create_task(self._work(self._queue))
        future = loop.create_future()
        self._queue.put_nowait((service, kind, query, k, future))
        return await future

    async def _work(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            if self.batches and self.batches[-1] > len(batch):
                await self._top_up(queue, batch)
            self.batches = [*self.batches[-99:], len(batch)]
            groups: dict[tuple[int, str], list[tuple]] = {}
            for item in batch:  # a query stays with the pair it captured
                groups.setdefault((id(item[0]), item[1]), []).append(item)
            for items in groups.values():
                await self._answer(items)

    async def _top_up(self, queue: asyncio.Queue, batch: list) -> None:
        """Wait up to ``max_wait_s`` for the rest of a busy stream: the clients of the last, larger batch are
        sending their next queries right now, and one call for all of them beats two half-full calls."""
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch and (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                return

    async def _answer(self, items: list[tuple]) -> None:
        service, kind, k = items[0][0], items[0][1], max(item[3] for item in items)
        try:
            results = await self.run(BATCH_CALLS[kind], service, [item[2] for item in items], k)
        except Exception as exc:  # noqa: BLE001 - delivered to each waiting request
            for *_, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, wanted, future), hits in zip(items, results):
            if not future.done():
                future.set_result(hits[:wanted])
