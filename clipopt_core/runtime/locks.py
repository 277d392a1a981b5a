"""Exclusive, bounded-wait locks on local working folders (``fcntl.flock`` on ``<folder>/.lock``).

A training work folder is named by a config hash, so two runs with the same config share
it. :func:`work_dir_lock` makes the second one wait until the first is done (then it
resumes from the finished checkpoint instead of interleaving writes with the first), and
gives up after a bounded time with :class:`WorkDirLocked`, naming the holder's pid.

The kernel drops a ``flock`` when its holder dies (even on SIGKILL), so a crashed run
never leaves a stale lock behind. The lock is re-entrant within one thread: the Dagster
asset holds it from training through publishing while :func:`clipopt_core.train.loop.fit`
takes it again inside. Local filesystems only (``flock`` over NFS is not reliable).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"
TIMEOUT_ENV = "CLIPOPT_LOCK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600.0
_POLL_S = 0.2

_held: dict[tuple[str, int], tuple[int, int]] = {}  # (lock path, thread id) -> (fd, depth)
_held_guard = threading.Lock()


class WorkDirLocked(RuntimeError):
    """Another process (or thread) kept the work folder locked for longer than the wait bound."""

    def __init__(self, work_dir: Path, holder: dict, waited_s: float) -> None:
        pid = holder.get("pid", "unknown")
        super().__init__(
            f"work folder {work_dir} is locked by pid {pid} on {holder.get('host', 'unknown host')} "
            f"(since {holder.get('since', '?')}): another run is training the same config. Waited {waited_s:.1f}s "
            f"(limit: {TIMEOUT_ENV}). Wait for that run to finish, or stop it; its progress is resumed, not lost."
        )
        self.work_dir, self.holder_pid, self.waited_s = work_dir, pid, waited_s


def lock_timeout_s(timeout_s: float | None = None) -> float:
    """``timeout_s`` if given, else ``$CLIPOPT_LOCK_TIMEOUT_S``, else one hour."""
    if timeout_s is not None:
        return float(timeout_s)
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def read_holder(work_dir: Path) -> dict:
    """What the current (or last) holder wrote into the lock file: ``pid``, ``host``, ``since``."""
    try:
        return json.loads((work_dir / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def work_dir_lock(work_dir: Path, *, timeout_s: float | None = None,
                  on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``work_dir/.lock`` exclusively for the ``with`` block (re-entrant per thread).

    Args:
        work_dir: the folder to own; created when missing.
        timeout_s: how long to wait for another holder (default: :func:`lock_timeout_s`).
        on_wait: called once with a message when the lock is busy and we start waiting.
    Raises:
        WorkDirLocked: still busy after ``timeout_s`` seconds.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    if _follower_rank():  # under torchrun rank 0 holds the lock for the whole group
        yield
        return
    path = str((work_dir / LOCK_FILE).resolve())
    key = (path, threading.get_ident())
    with _held_guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            _release(key)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, work_dir, lock_timeout_s(timeout_s), on_wait)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
    with _held_guard:
        _held[key] = (fd, 1)
    try:
        yield
    finally:
        _release(key)


def _follower_rank() -> bool:
    """A non-zero rank of an initialised ``torch.distributed`` group (never imports torch itself)."""
    if "torch.distributed" not in sys.modules:
        return False
    from clipopt_core.runtime.distributed import is_follower

    return is_follower()


def _acquire(fd: int, work_dir: Path, timeout_s: float, on_wait: Callable[[str], None] | None) -> None:
    started = time.monotonic()
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise WorkDirLocked(work_dir, read_holder(work_dir), waited) from None
            if not announced and on_wait is not None:
                holder = read_holder(work_dir)
                on_wait(f"work folder {work_dir} is locked by pid {holder.get('pid', 'unknown')} (same config "
                        f"training elsewhere); waiting up to {timeout_s:.0f}s, then resuming from its checkpoint")
            announced = True
            time.sleep(min(_POLL_S, max(timeout_s - waited, 0.0)))


def _release(key: tuple[str, int]) -> None:
    with _held_guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
