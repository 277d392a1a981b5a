"""``clipopt index-shards``: sharded gallery embeddings and the index built from them (see :mod:`clipopt_core.serve.shards`).

  clipopt index-shards embed --store URL --num-shards 64 [--shard I …] [--variant V] [--device cuda]
  clipopt index-shards build --store URL --num-shards 64 [--kind ivf_pq] [--target-recall 0.95]

``embed`` with no ``--shard`` embeds the shard ``$JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job: one
pod per shard), else every shard in turn; published shards of the same model are skipped. The model
is the champion (``releases/champion.json``; ``--variant`` overrides; ``baseline`` is the base model).
``build`` trains the quantiser once, adds the shards and writes ``<prefix>/index-staging/``
(merged.faiss, one index per shard, ids.parquet, info.json), promoted to ``<prefix>/index/`` only when
recall@10 meets ``--target-recall`` (else it exits 2 and the served index stays as it was). The default prefix is the one the ``gallery_embeddings``
and ``faiss_index`` assets use, so ``clipopt search`` serves the result. Each prints a JSON summary.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

INDEX_KINDS = ("auto", "flat", "ivf_flat", "ivf_pq")


def add_parser(commands: Any, default_store: str) -> None:
    """Register ``index-shards`` (sub-commands ``embed`` and ``build``) on the ``clipopt`` parser."""
    parser = commands.add_parser("index-shards", help="sharded gallery embeddings + faiss index (big galleries)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    for name in ("embed", "build"):
        action = actions.add_parser(name)
        action.add_argument("--store", default=default_store)
        action.add_argument("--num-shards", type=int, required=True)
        action.add_argument("--prefix", default="serving", help="store prefix (default: the served index)")
    embed = actions.choices["embed"]
    embed.add_argument("--shard", type=int, action="append", help="shard(s) to embed (default: $JOB_COMPLETION_INDEX or all)")
    embed.add_argument("--variant", default=None, help="baseline, stage1, 2sft, mcip, mcip_realign (default: the served one)")
    embed.add_argument("--device", default="cpu")
    embed.add_argument("--batch-size", type=_batch_size, default="auto",
                       help="images per batch, or auto (64 on CPU; 1024 on CUDA, halved on out-of-memory)")
    build = actions.choices["build"]
    build.add_argument("--kind", choices=INDEX_KINDS, default="auto")
    build.add_argument("--target-recall", type=float, default=0.95)
    build.add_argument("--nlist", type=int, default=None)
    build.add_argument("--memory-budget-gib", type=float, default=8.0)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``index-shards embed`` or ``build``; returns the JSON summary."""
    from clipopt_core.runtime.storage import ArtifactStore

    store = ArtifactStore(args.store)
    return _embed(store, args) if args.action == "embed" else _build(store, args)


def _embed(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    from clipopt_core.layout import Keys
    from clipopt_core.serve import shards as sharding
    from clipopt_core.serve.champion import CHAMPION_KEY, resolve_served
    from clipopt_core.serve.search import lazy_image_embedder

    if not store.exists(Keys.manifest):
        raise FileNotFoundError(f"{store.url(Keys.manifest)} is missing; materialise image_manifest first")
    cache = Path(os.environ.get("CLIPOPT_CACHE", Path.home() / ".cache" / "clipopt"))
    nothing_served = not store.exists(CHAMPION_KEY) and not store.exists(Keys.report_json)
    variant, model_key, spec = resolve_served(store, cache, args.variant or ("baseline" if nothing_served else None))
    shards = args.shard or ([int(os.environ["JOB_COMPLETION_INDEX"])] if "JOB_COMPLETION_INDEX" in os.environ
                            else list(range(args.num_shards)))
    manifest = store.read_parquet(Keys.manifest)
    embed = lazy_image_embedder(spec, cache, device=args.device, batch_size=args.batch_size)
    results = [sharding.embed_shard(manifest, shard, args.num_shards, store, embed, model_key=model_key,
                                    prefix=args.prefix) for shard in shards]
    return {"variant": variant, "model_key": model_key,
            "shards": [{k: r[k] for k in ("shard", "rows", "dim", "skipped", "key")} for r in results]}


def _build(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    from clipopt_core.serve import shards as sharding
    from clipopt_core.serve.index import IndexSpec
    from clipopt_core.serve.promotion import build_and_promote

    spec = IndexSpec(kind=args.kind, target_recall=args.target_recall, nlist=args.nlist,
                     memory_budget_bytes=int(args.memory_budget_gib * 2**30))
    info, outcome = build_and_promote(store, args.num_shards, spec, args.prefix)
    if not outcome.promoted:
        raise RuntimeError(f"index {outcome.reason}")
    return {**info, **outcome.metadata(), "index": store.url(sharding.index_key(args.prefix, "merged.faiss"))}
