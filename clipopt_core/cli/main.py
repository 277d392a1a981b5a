"""``clipopt`` command line: the same core code as the Dagster assets, without Dagster.

Commands:
  clipopt train --stage NAME [--store URL] [--settings FILE.json]    train one registered stage from the
      store's inputs, as its asset does (data-parallel: torchrun --nproc-per-node N -m clipopt_core.cli.main train …)
  clipopt search --store URL (--image PATH | --text "…") [-k 10]     query the served index
  clipopt report [--store URL]                                        print the latest evaluation report
  clipopt index-shards {embed,build} --num-shards N [--store URL] …   sharded embeddings + index (big galleries)
  clipopt serve [--store URL] [--host 127.0.0.1] [--port 8000]       HTTP API + web page, hot-swapped on publication
  clipopt benchmark-suite --model NAME (--pretrained TAG | --checkpoint PATH) --roots roots.yaml [--out t1.md]
      the paper's Table 1 on any open_clip model, from benchmark folders on disk
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from clipopt_core.cli import shards as cli_shards  # noqa: E402 - argparse only; its heavy imports are lazy
from clipopt_core.cli import suite as cli_suite  # noqa: E402 - argparse only; its heavy imports are lazy
from clipopt_core.layout import default_cache_dir, default_store_url  # noqa: E402
from clipopt_core.registry import STAGES  # noqa: E402
from clipopt_core.runtime.memory import retain_freed_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one stage from the store's inputs (see README)")
    train.add_argument("--stage", choices=[name for stage in STAGES for name in (stage.asset, stage.variant)],
                       required=True, help="a registered stage, by asset or variant name")
    train.add_argument("--store", default=default_store_url())
    train.add_argument("--settings", type=Path, default=None,
                       help="JSON file of settings over the stage's defaults (the launchpad's fields)")
    train.add_argument("--cache", default=default_cache_dir())
    train.add_argument("--device", default=os.environ.get("CLIPOPT_DEVICE", "cpu"))
    search = commands.add_parser("search", help="query the served faiss index")
    search.add_argument("--store", default=default_store_url())
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="path or URL of a query image")
    query.add_argument("--text", help="a text query")
    search.add_argument("-k", type=int, default=10)
    report = commands.add_parser("report", help="print the latest evaluation report")
    report.add_argument("--store", default=default_store_url())
    rollback = commands.add_parser("rollback", help="serve an earlier champion again; --list shows which model served when")
    rollback.add_argument("--store", default=default_store_url())
    rollback.add_argument("--catalogue", default=f"{default_cache_dir()}/catalogue.duckdb")
    rollback.add_argument("--to", default=None, help="model key from --list (default: the champion before the current one)")
    rollback.add_argument("--list", action="store_true", help="print the served-model history and change nothing")
    rollback.add_argument("--device", default=os.environ.get("CLIPOPT_DEVICE", "cpu"))
    cli_shards.add_parser(commands, default_store_url())
    add_serve_parser(commands)
    cli_suite.add_parser(commands, default_cache_dir())
    args = parser.parse_args(argv)
    retain_freed_memory()  # no page faults per training step (runtime/memory.py)
    try:
        if args.command == "train":
            settings = json.loads(args.settings.read_text()) if args.settings else {}
            summary = run_train(args.stage, args.store, settings, cache_dir=args.cache, device=args.device)
            if summary is not None:  # None on the ranks > 0 of a torchrun group
                print(json.dumps(summary, indent=2))
        elif args.command == "search":
            for hit in run_search(args.store, image=args.image, text=args.text, k=args.k):
                print(json.dumps(hit))
        elif args.command == "index-shards":
            print(json.dumps(cli_shards.run(args), indent=2, default=str))
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "rollback":
            print(run_rollback(args))
        elif args.command == "benchmark-suite":
            print(cli_suite.run(args))
        else:
            print(run_report(args.store))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"clipopt {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def run_train(stage: str, store_url: str, settings: dict[str, Any], *, cache_dir: str,
              device: str = "cpu") -> dict[str, Any] | None:
    """Train (or reuse) ``stage`` through :func:`clipopt_core.train.job.run_stage`; returns its metadata.

    The store must hold the stage's inputs (``data/splits.parquet``, ``models/base/spec.json``, and
    ``captions/pseudo_captions.parquet`` for MCIP or ``data/caption_pairs.parquet`` + the encoder's
    checkpoint for realignment), as the Dagster data assets write them. ``S3`` endpoints come from
    ``$CLIPOPT_S3_ENDPOINT``. Under torchrun only rank 0 returns the metadata (others ``None``).
    """
    from tqdm import tqdm

    from clipopt_core.runtime import distributed
    from clipopt_core.train.job import StageRequest, run_stage

    request = StageRequest(asset=stage, store_url=store_url, cache_dir=cache_dir, settings=settings, device=device,
                           endpoint_url=os.environ.get("CLIPOPT_S3_ENDPOINT"))
    request.join_ranks()
    bar = tqdm(desc=request.asset, unit="step", disable=not distributed.is_main())

    def _log(event: dict[str, float]) -> None:
        if "val_score" in event:
            bar.set_postfix(val=f"{event['val_score']:.4f}")
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.4f}")

    metadata = run_stage(request, log=_log, on_wait=lambda message: print(message, file=sys.stderr))
    bar.close()
    return metadata


def run_search(store_url: str, *, image: str | None = None, text: str | None = None, k: int = 10) -> list[dict[str, Any]]:
    """Top-``k`` gallery images for an image or text query, using the served variant's model and index."""
    from clipopt_core.serve.search import SearchService
    from clipopt_core.runtime.storage import ArtifactStore

    service = SearchService.from_store(ArtifactStore(store_url))
    return service.search_image(image, k) if image else service.search_text(text or "", k)


def add_serve_parser(commands: Any) -> None:
    """``clipopt serve``: flags, each defaulting to its ``CLIPOPT_SERVE_*`` variable. The bearer token is
    read from ``CLIPOPT_SERVE_TOKEN`` only (a flag would show in the process list)."""
    env = os.environ.get
    serve = commands.add_parser("serve", help="HTTP search API and web page over the published index")
    serve.add_argument("--store", default=default_store_url())
    serve.add_argument("--host", default=env("CLIPOPT_SERVE_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env("CLIPOPT_SERVE_PORT", "8000")))
    serve.add_argument("--poll-seconds", type=float, default=float(env("CLIPOPT_SERVE_POLL_SECONDS", "10")),
                       help="how often the index's info.json is checked for a new publication")
    serve.add_argument("--max-upload-bytes", type=int, default=int(env("CLIPOPT_SERVE_MAX_UPLOAD_BYTES", str(10 * 2**20))))
    serve.add_argument("--max-k", type=int, default=int(env("CLIPOPT_SERVE_MAX_K", "100")))
    serve.add_argument("--max-batch", type=int, default=int(env("CLIPOPT_SERVE_MAX_BATCH", "32")),
                       help="most concurrent queries (of one kind) embedded in one encoder call")
    serve.add_argument("--cors-origin", action="append", default=[o for o in env("CLIPOPT_SERVE_CORS", "").split(",") if o],
                       help="an origin allowed to call the API from a browser (repeatable; none by default)")
    serve.add_argument("--access-log", action="store_true",
                       help="log every request line (off by default: query texts are user data)")


def run_serve(args: argparse.Namespace) -> None:
    """Load the served (and baseline) pair, start the watcher and run uvicorn until interrupted."""
    import uvicorn

    from clipopt_core.runtime.storage import ArtifactStore, configure_s3_defaults
    from clipopt_core.serve.http import ServeSettings, create_app, redacted
    from clipopt_core.serve.live import LiveIndexes

    configure_s3_defaults(os.environ.get("CLIPOPT_S3_ENDPOINT"))  # image URIs on S3 for thumbnails
    live = LiveIndexes.load(ArtifactStore(args.store))
    settings = ServeSettings(token=os.environ.get("CLIPOPT_SERVE_TOKEN") or None, cors_origins=tuple(args.cors_origin),
                             max_upload_bytes=args.max_upload_bytes, max_k=args.max_k, max_batch=args.max_batch,
                             extra={"store": redacted(args.store)})
    live.start(args.poll_seconds)
    try:
        uvicorn.run(create_app(live, settings), host=args.host, port=args.port, log_level="info",
                    access_log=args.access_log)
    finally:
        live.stop()


def run_rollback(args: argparse.Namespace) -> str:
    """``clipopt rollback``: the served-model history (``--list``) or a rollback's JSON summary."""
    from clipopt_core.runtime.catalog import SERVED_HISTORY, Catalog
    from clipopt_core.runtime.storage import ArtifactStore
    from clipopt_core.runtime.text import markdown_table
    from clipopt_core.serve.rollback import rollback
    from clipopt_core.serve.shards import shard_count

    catalog = Catalog(args.catalogue)
    if args.list:
        history = catalog.read(SERVED_HISTORY, "decided_at")
        columns = ["decided_at", "action", "champion_model_key", "champion_weights_sha256", "champion_report_id",
                   "champion_data_fingerprint", "reason"]
        return markdown_table(history.select(columns).to_dicts()) if history.height else "no served-model history yet"
    summary = rollback(ArtifactStore(args.store), catalog, cache=Path(default_cache_dir()), num_shards=shard_count(),
                       to=args.to, device=args.device)
    return json.dumps(summary, indent=2)


def run_report(store_url: str) -> str:
    from clipopt_core.layout import Keys
    from clipopt_core.runtime.storage import ArtifactStore

    store = ArtifactStore(store_url)
    if not store.exists(Keys.report_md):
        raise FileNotFoundError(f"no evaluation report in {store_url}; materialise evaluation_report first")
    seeds = f"Seed sweep:        {store.url(Keys.seed_report_md)}\n" if store.exists(Keys.seed_report_md) else ""
    return (f"Evaluation report: {store.url(Keys.report_md)}\n"
            f"Teaser plot:       {store.url(Keys.teaser)}\n"
            f"Gallery (I2I):     {store.url(Keys.gallery)}\n"
            f"Gallery (T2I):     {store.url(Keys.gallery_t2i)}\n{seeds}\n" + store.read_bytes(Keys.report_md).decode())


if __name__ == "__main__":
    sys.exit(main())
