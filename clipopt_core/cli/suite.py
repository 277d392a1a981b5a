"""``clipopt benchmark-suite``: the paper's Table 1 on any open_clip checkpoint, from benchmark folders on disk.

  clipopt benchmark-suite --model ViT-L-14-336 --pretrained openai --roots roots.yaml [--columns …] [--out t1.md]
  clipopt benchmark-suite --model ViT-L-14-336 --checkpoint MCIP-ViT-L-14-336.pth --variant mcip_realign \\
      --paper-base ViT-L-14-336:openai --roots roots.yaml --device cuda --out t1.json

``--roots``: a YAML mapping of benchmark keys to folders in their official layouts (local or ``s3://``):
gpr1200, instre, cub, roxford5k, imagenet, imagenet_sketch, imagenet_a, objectnet, aircraft, flickr30k,
coco. A column whose root is missing is skipped with the key to set; the others run. ``--checkpoint``: a
weights file for ``--model`` (loaded without unpickling code) or a clipopt checkpoint folder. When the base
model is one the paper used, its figures and the difference sit under ours. ``--out`` writes markdown
(``.md``) or JSON (``.json``, every protocol output, with the per-query scores in ``<name>.scores.parquet``
beside it); the table is printed either way. ``--against`` takes such a JSON of another model (the base
model, say): its row is the reference, and each of our cells gets the difference with its 95% paired-bootstrap
interval over the same queries (docs/method.md#benchmark-suite):

  clipopt benchmark-suite --model ViT-L-14-336 --pretrained openai --roots roots.yaml --out base.json
  clipopt benchmark-suite --model ViT-L-14-336 --checkpoint ckpt/ --variant mcip_realign --roots roots.yaml \\
      --against base.json --out mcip.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from clipopt_core.suite.run import ColumnResult


def add_parser(commands: Any, default_cache: str) -> None:
    """Register ``benchmark-suite`` on the ``clipopt`` parser."""
    from clipopt_core.registry import VARIANTS

    parser = commands.add_parser("benchmark-suite", help="Table 1 of the paper on one model (no Dagster)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="open_clip name (ViT-L-14-336), local-dir:… or clipopt-tiny")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", default=None, help="open_clip pretrained tag (openai, webli, …)")
    weights.add_argument("--checkpoint", type=Path, default=None, help="weights file or clipopt checkpoint folder")
    parser.add_argument("--roots", type=Path, required=True, help="YAML file: benchmark key → folder")
    parser.add_argument("--columns", nargs="+", default=None,
                        help="column names (i2i_gpr1200 … t2i_coco, as in the report); default: all 14")
    parser.add_argument("--variant", default=None,
                        help=f"row name, matched to the paper's rows ({', '.join(VARIANTS)}); "
                             "default baseline with --pretrained, checkpoint with --checkpoint")
    parser.add_argument("--paper-base", default=None, metavar="NAME:TAG",
                        help="the paper's base model to compare with (default: --model:--pretrained)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report file, .md or .json (per-query scores in <name>.scores.parquet beside a .json)")
    parser.add_argument("--against", type=Path, default=None, metavar="REPORT.json",
                        help="a --out .json of another model: its row is the reference of our differences, "
                             "each with a 95%% paired-bootstrap interval")
    parser.add_argument("--device", default=os.environ.get("CLIPOPT_DEVICE", "cpu"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", default=default_cache, help="model cache folder")
    parser.add_argument("--embeddings-cache", type=Path, default=None,
                        help="folder to keep embeddings in between runs (ImageNet train is the costly one)")


def run(args: argparse.Namespace) -> str:
    """Evaluate the columns, write ``--out`` (temp file, then rename) and return the markdown table."""
    from clipopt_core.models.loading import ModelSpec, checkpoint_spec, load_model
    from clipopt_core.suite import paper
    from clipopt_core.suite.columns import SuiteOptions, read_roots, select_columns
    from clipopt_core.suite.embedding import SuiteEmbedder
    from clipopt_core.suite.intervals import table_intervals
    from clipopt_core.suite.run import (evaluate_column, json_safe, merge_variants, scores_frame, skipped_reasons,
                                        table_values)
    from clipopt_core.suite.table import build_table1

    if args.out is not None and args.out.suffix not in (".md", ".json"):
        raise ValueError(f"--out must end in .md or .json, got {args.out}")
    roots, columns = read_roots(args.roots), select_columns(args.columns)
    if args.checkpoint is not None and args.checkpoint.is_dir():
        spec = checkpoint_spec(args.checkpoint)
    else:
        spec = ModelSpec(args.model, str(args.checkpoint) if args.checkpoint else args.pretrained)
    variant = args.variant or ("checkpoint" if args.checkpoint else "baseline")
    reference, earlier = read_report(args.against) if args.against is not None else (variant, {})
    if args.against is not None and reference == variant:
        raise ValueError(f"--against {args.against} holds the rows of {variant!r} too; name ours with --variant")
    base_name, _, base_tag = (args.paper_base or f"{args.model}:{args.pretrained or ''}").partition(":")
    base = paper.paper_base(base_name, base_tag)
    if args.paper_base and base is None:
        known = ", ".join(f"{name}:{tag}" for name, tag in paper.BASE_MODELS)
        raise ValueError(f"--paper-base {args.paper_base} is not a base model of the paper; known: {known}")
    bundle = load_model(spec, cache_dir=Path(args.cache), device=args.device)
    embedder = SuiteEmbedder(bundle, device=args.device, batch_size=args.batch_size, cache_dir=args.embeddings_cache)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    results = [evaluate_column(column, roots, {variant: lambda: embedder}, SuiteOptions(), log=log)
               for column in columns]
    results = [merge_variants(earlier[r.column], r) if r.column in earlier else r for r in results]
    table = build_table1(table_values(results), paper=paper.paper_rows(base) if base else None,
                         paper_source=paper.SOURCE, skipped=skipped_reasons(results), baseline=reference,
                         intervals=table_intervals(results, baseline=reference))
    markdown = f"Table 1 of {spec.name} ({spec.pretrained or 'no pretrained tag'}) as {variant}\n\n{table.markdown()}"
    if args.out is not None and args.out.suffix == ".json":
        payload = {"model": {"name": spec.name, "pretrained": spec.pretrained}, "variant": variant,
                   "paper_base": base, "columns": [r.to_json() for r in results], "table": list(table.rows)}
        _write_atomically(scores_path(args.out), scores_frame(results).write_parquet)  # before the JSON naming it
        _write_atomically(args.out, lambda path: path.write_text(json.dumps(json_safe(payload), indent=2)))
    elif args.out is not None:
        _write_atomically(args.out, lambda path: path.write_text(markdown))
    return markdown


def scores_path(report: Path) -> Path:
    """Where the per-query scores of a ``--out`` JSON report are: ``<name>.scores.parquet`` beside it."""
    return report.with_name(f"{report.stem}.scores.parquet")


def read_report(path: Path) -> tuple[str, dict[str, "ColumnResult"]]:
    """``(variant, {column: ColumnResult with its per-query scores})`` of a ``--out`` JSON report."""
    import polars as pl

    from clipopt_core.suite.run import ColumnResult, attach_scores

    if path.suffix != ".json" or not path.is_file():
        raise ValueError(f"--against {path} must be a .json report written by --out")
    if not scores_path(path).is_file():
        raise ValueError(f"--against {path}: its per-query scores {scores_path(path)} are missing; "
                         f"re-run that model with --out {path}")
    payload = json.loads(path.read_text())
    results = attach_scores([ColumnResult.from_json(c) for c in payload["columns"]], pl.read_parquet(scores_path(path)))
    return str(payload["variant"]), {r.column: r for r in results if not r.skipped}


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(staging path)``, then rename the staging file to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    write(staging)
    os.replace(staging, path)
