"""``clipopt`` command line: the same core code as the Dagster assets, without Dagster.

Commands:
  clipopt train --stage {retrieval,mcip,realign} --config run.json   train one stage
      (data-parallel: torchrun --nproc-per-node N -m clipopt_core.cli.main train …)
  clipopt search --store URL (--image PATH | --text "…") [-k 10]     query the served index
  clipopt report [--store URL]                                        print the latest evaluation report
  clipopt index-shards {embed,build} --num-shards N [--store URL] …   sharded embeddings + index (big galleries)
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
from clipopt_core.runtime.memory import retain_freed_memory  # noqa: E402


def default_store_url() -> str:
    cache = os.environ.get("CLIPOPT_CACHE", str(Path.home() / ".cache" / "clipopt"))
    return os.environ.get("CLIPOPT_ARTIFACTS", f"file://{cache}/artifacts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one stage from a JSON config (see README)")
    train.add_argument("--stage", choices=("retrieval", "mcip", "realign"), required=True)
    train.add_argument("--config", type=Path, required=True)
    search = commands.add_parser("search", help="query the served faiss index")
    search.add_argument("--store", default=default_store_url())
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="path or URL of a query image")
    query.add_argument("--text", help="a text query")
    search.add_argument("-k", type=int, default=10)
    report = commands.add_parser("report", help="print the latest evaluation report")
    report.add_argument("--store", default=default_store_url())
    cli_shards.add_parser(commands, default_store_url())
    args = parser.parse_args(argv)
    retain_freed_memory()  # no page faults per training step (runtime/memory.py)
    try:
        if args.command == "train":
            summary = run_train(args.stage, json.loads(args.config.read_text()))
            if summary is not None:  # None on the ranks > 0 of a torchrun group
                print(json.dumps(summary, indent=2))
        elif args.command == "search":
            for hit in run_search(args.store, image=args.image, text=args.text, k=args.k):
                print(json.dumps(hit))
        elif args.command == "index-shards":
            print(json.dumps(cli_shards.run(args), indent=2, default=str))
        else:
            print(run_report(args.store))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"clipopt {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def run_train(stage: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """Train ``stage`` as ``config`` says; returns the checkpoint folder and the fit summary.

    Config keys: ``model`` ({name, pretrained, image_size}), ``splits`` (parquet with uri,
    label, caption, split, image_id), ``work_dir``, ``cache_dir``, ``train`` (TrainConfig
    fields), stage fields (RetrievalConfig / RealignConfig), and for MCIP
    ``pseudo_captions`` (parquet), for realign ``pairs`` (parquet with uri, caption); ``device``
    (``cpu`` default, ``cuda``: under torchrun ``cuda:$LOCAL_RANK``). Under torchrun every rank trains a
    slice of each global batch and only rank 0 writes and returns the summary (others return ``None``).
    """
    import polars as pl
    from tqdm import tqdm

    from clipopt_core.runtime import distributed

    from clipopt_core.train import runner as pipeline
    from clipopt_core.models.loading import ModelSpec
    from clipopt_core.train.config import RealignConfig, RetrievalConfig
    from clipopt_core.train.config import TrainConfig

    spec = ModelSpec(**config["model"])
    splits = pl.read_parquet(config["splits"])
    work_dir, cache_dir = Path(config["work_dir"]), Path(config.get("cache_dir", Path.home() / ".cache" / "clipopt"))
    train_config = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in config.get("train", {}).items()})
    options = config.get("stage_options", {})
    device = distributed.setup(config.get("device", "cpu"))  # joins the torchrun group, if any
    bar = tqdm(desc=f"{stage}", unit="step", disable=not distributed.is_main())

    def _log(event: dict[str, float]) -> None:
        if "val_score" in event:
            bar.set_postfix(val=f"{event['val_score']:.4f}")
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.4f}")

    if stage == "realign":
        output = pipeline.train_realign(spec, pl.read_parquet(config["pairs"]), splits.filter(pl.col("split") == "val"),
                                        RealignConfig(train=train_config, **options), work_dir, cache_dir=cache_dir,
                                        stage=stage, device=device, log=_log)
    else:
        captions = pl.read_parquet(config["pseudo_captions"]) if stage == "mcip" else None
        options = {"mc_weight": 0.25, **options} if stage == "mcip" else options
        output = pipeline.train_retrieval(spec, splits, RetrievalConfig(train=train_config, **options), work_dir,
                                          cache_dir=cache_dir, stage=stage, pseudo_captions=captions, device=device,
                                          log=_log)
    bar.close()
    if not distributed.is_main():
        return None
    return {"checkpoint": str(output.checkpoint), "best_val_score": output.fit.best_score,
            "best_step": output.fit.best_step, "steps": output.fit.steps, "seconds": round(output.fit.seconds, 1)}


def run_search(store_url: str, *, image: str | None = None, text: str | None = None, k: int = 10) -> list[dict[str, Any]]:
    """Top-``k`` gallery images for an image or text query, using the served variant's model and index."""
    from clipopt_core.serve.search import SearchService
    from clipopt_core.runtime.storage import ArtifactStore

    service = SearchService.from_store(ArtifactStore(store_url))
    return service.search_image(image, k) if image else service.search_text(text or "", k)


def run_report(store_url: str) -> str:
    from clipopt_core.runtime.storage import ArtifactStore

    store = ArtifactStore(store_url)
    if not store.exists("reports/evaluation.md"):
        raise FileNotFoundError(f"no evaluation report in {store_url}; materialise evaluation_report first")
    return (f"Evaluation report: {store.url('reports/evaluation.md')}\n"
            f"Teaser plot:       {store.url('reports/teaser.png')}\n"
            f"Gallery:           {store.url('reports/gallery.png')}\n\n" + store.read_bytes("reports/evaluation.md").decode())


if __name__ == "__main__":
    sys.exit(main())
