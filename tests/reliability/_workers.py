"""Subprocess entry points for the reliability tests (``python -m tests.reliability._workers CMD …``).

Each command does one thing a real process would do (materialise assets, hold a lock, write to
the store or the catalogue) so the tests can kill it, race it or make it wait. Output: one JSON
line on stdout at the end (``materialize``), or a ``ready`` file the test polls for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _materialize(args: argparse.Namespace) -> int:
    """dg.materialize of ``--assets`` with the tiny resources under ``--tmp`` (training config from ``--train``)."""
    import dagster as dg

    from clipopt_dagster.definitions import ASSETS
    from tests.pipeline.conftest import tiny_resources, tiny_run_config

    if args.ready:
        Path(args.ready).write_text(str(os.getpid()))
    while args.go and not Path(args.go).exists():  # imports done: start together with the other workers
        time.sleep(0.01)
    names = args.assets.split(",")
    selected = [a for a in ASSETS if a.key.to_user_string() in names]
    ops = {k: v for k, v in tiny_run_config()["ops"].items() if k in names}
    if args.train:
        ops["retrieval_encoder"] = {"config": json.loads(args.train)}
    resources = tiny_resources(Path(args.tmp), Path(args.source), None)
    result = dg.materialize(selected, resources=resources, run_config={"ops": ops}, raise_on_error=False)
    weights = ""
    if result.success and "retrieval_encoder" in names:
        weights = result.asset_materializations_for_node("retrieval_encoder")[0].metadata["weights_sha256"].value
    print(json.dumps({"success": result.success, "weights_sha256": weights, "pid": os.getpid()}), flush=True)
    return 0 if result.success else 1


def _hold_lock(args: argparse.Namespace) -> int:
    """Hold the work-folder lock of ``--work`` for ``--seconds`` (touching ``--ready`` once held)."""
    from clipopt_core.runtime.locks import work_dir_lock

    with work_dir_lock(Path(args.work)):
        Path(args.ready).write_text(json.dumps({"pid": os.getpid(), "release_at": time.time() + args.seconds}))
        time.sleep(args.seconds)
    return 0


class _HangingFS:
    """Delegates to a real fsspec filesystem, but ``pipe_file``/``put_file`` write half the bytes and hang.

    Only calls number ``hang_on`` and later hang (earlier ones go through), so a ``put_dir`` can be
    stopped after some of its files are published.
    """

    def __init__(self, fs: Any, ready: Path, hang_on: int) -> None:
        self._fs, self._ready, self._hang_on, self._calls = fs, ready, hang_on, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def _hang(self, path: str, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        self._ready.write_text(path)
        time.sleep(3600)

    def pipe_file(self, path: str, data: bytes, **kwargs: Any) -> None:
        self._calls += 1
        if self._calls >= self._hang_on:
            self._hang(path, data)
        self._fs.pipe_file(path, data, **kwargs)

    def put_file(self, local: str, path: str, **kwargs: Any) -> None:
        self._calls += 1
        if self._calls >= self._hang_on:
            self._hang(path, Path(local).read_bytes())
        self._fs.put_file(local, path, **kwargs)


def _store_write(args: argparse.Namespace) -> int:
    """``write_bytes`` (``--mode bytes``) or ``put_dir`` (``--mode dir``) that hangs mid-write until killed.

    ``--mode loop``: no hanging; publish versions 1, 2, 3 … of a large payload forever (killed at a random moment).
    """
    from clipopt_core.runtime.storage import ArtifactStore

    store = ArtifactStore(args.store)
    ready = Path(args.ready)
    if args.mode == "loop":
        version = 0
        while True:
            version += 1
            store.write_bytes(args.key, bytes([version % 256]) * args.size)
            ready.write_text(str(version))
    store.fs = _HangingFS(store.fs, ready, args.hang_on)
    if args.mode == "bytes":
        store.write_bytes(args.key, b"N" * args.size)
    else:
        store.put_dir(Path(args.local), args.key)
    return 0


def _catalog(args: argparse.Namespace) -> int:
    """Append to (``--mode append``) or read (``--mode read``) the catalogue ``--count`` times; or hold it open."""
    import duckdb
    import polars as pl

    if args.mode == "hold":
        with duckdb.connect(args.path) as connection:
            connection.execute("SELECT 1").fetchall()
            Path(args.ready).write_text(json.dumps({"pid": os.getpid(), "release_at": time.time() + args.seconds}))
            time.sleep(args.seconds)
        return 0
    from clipopt_dagster.resources import CatalogResource

    catalog = CatalogResource(path=args.path, lock_timeout_s=args.timeout)
    Path(args.ready).write_text(str(os.getpid()))
    while args.go and not Path(args.go).exists():  # start together with the other workers
        time.sleep(0.01)
    seen = []
    for number in range(args.count):
        if args.mode == "append":
            frame = pl.DataFrame({"run_id": [f"{os.getpid()}-{number}"] * 2, "variant": ["baseline", "stage1"],
                                  "i2i_map": [0.5, 0.6]})
            seen.append(catalog.append_report(frame))
        else:
            seen.append(catalog.history().height)
    print(json.dumps({"results": seen}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliability-worker")
    commands = parser.add_subparsers(dest="command", required=True)
    materialize = commands.add_parser("materialize")
    materialize.add_argument("--tmp", required=True)
    materialize.add_argument("--source", required=True)
    materialize.add_argument("--assets", required=True)
    materialize.add_argument("--train", default="")
    materialize.add_argument("--go", default="")
    materialize.add_argument("--ready", default="")
    hold = commands.add_parser("hold-lock")
    hold.add_argument("--work", required=True)
    hold.add_argument("--ready", required=True)
    hold.add_argument("--seconds", type=float, default=3600)
    store = commands.add_parser("store-write")
    store.add_argument("--store", required=True)
    store.add_argument("--key", required=True)
    store.add_argument("--mode", choices=("bytes", "dir", "loop"), required=True)
    store.add_argument("--ready", required=True)
    store.add_argument("--size", type=int, default=1 << 20)
    store.add_argument("--local", default="")
    store.add_argument("--hang-on", type=int, default=1)
    catalog = commands.add_parser("catalog")
    catalog.add_argument("--path", required=True)
    catalog.add_argument("--mode", choices=("append", "read", "hold"), required=True)
    catalog.add_argument("--ready", required=True)
    catalog.add_argument("--count", type=int, default=1)
    catalog.add_argument("--seconds", type=float, default=2.0)
    catalog.add_argument("--timeout", type=float, default=60.0)
    catalog.add_argument("--go", default="")
    args = parser.parse_args(argv)
    handler = {"materialize": _materialize, "hold-lock": _hold_lock, "store-write": _store_write, "catalog": _catalog}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
