"""The paper's benchmark suite: one partition per Table 1 column, every variant, then the Table 1 report.

Partitioned by *column*, not by dataset: a partition is one cell group of the table, a missing root skips
exactly the columns it feeds, and a column re-runs alone. Columns that share a dataset (ImageNet train is
the kNN database of three columns; ImageNet val feeds a kNN and a zero-shot column) share its embeddings
through the on-disk embedding cache in the compute cache (:class:`clipopt_core.suite.embedding.SuiteEmbedder`),
keyed by tower weights, so no image is embedded twice by the same tower.

Each partition stores its point values as JSON and the per-query scores behind them as parquet next to it
(:func:`scores_key`), so ``table1_report`` adds paired-bootstrap intervals of every difference to the baseline
from stored partitions (:func:`clipopt_core.suite.intervals.table_intervals`).

Roots come from the run config (``roots``) over a YAML roots file (``roots_file``, default
``$CLIPOPT_SUITE_ROOTS``). Neither asset is part of ``retraining_job``: the default job never needs them.
"""

import os
import time
from dataclasses import replace
from functools import partial
from typing import Literal

import dagster as dg
from pydantic import Field, field_validator

from clipopt_core.evaluate.bootstrap import BootstrapConfig
from clipopt_core.evaluate.protocol import OPENAI_TEMPLATES
from clipopt_core.layout import MODEL_ROOT, base_spec, served_model_key, variant_spec
from clipopt_core.models.loading import load_model
from clipopt_core.registry import VARIANTS
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.suite import paper
from clipopt_core.suite.columns import COLUMN_NAMES, SuiteOptions, get_column, parse_roots, read_roots
from clipopt_core.suite.embedding import SuiteEmbedder
from clipopt_core.suite.intervals import table_intervals
from clipopt_core.suite.run import (ColumnResult, attach_scores, evaluate_column, json_safe, scores_frame,
                                    skipped_reasons, table_values)
from clipopt_core.suite.table import build_table1
from clipopt_dagster._helpers import GPU_POOL, md_table
from clipopt_dagster.assets_data import base_model
from clipopt_dagster.assets_training import TRAINING_ASSETS
from clipopt_dagster.configs import SHORT_TEMPLATES
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource

BENCHMARK_COLUMNS = dg.StaticPartitionsDefinition(list(COLUMN_NAMES))
GROUP = "benchmark_suite"
ROOTS_ENV = "CLIPOPT_SUITE_ROOTS"
RESULTS_PREFIX = "reports/suite"
TABLE1_MD = "reports/table1.md"
TABLE1_JSON = "reports/table1.json"


def result_key(column: str) -> str:
    """Store key of one column's results (every variant)."""
    return f"{RESULTS_PREFIX}/{column}.json"


def scores_key(column: str) -> str:
    """Store key of one column's per-query scores (every variant; :func:`clipopt_core.suite.run.scores_frame`)."""
    return f"{RESULTS_PREFIX}/{column}.scores.parquet"


class SuiteSettings(dg.Config):
    """``roots``: benchmark key → folder (local or ``s3://``), over those of ``roots_file`` (a YAML file;
    empty: ``$CLIPOPT_SUITE_ROOTS``, if set). ``variants``: the report variants to evaluate. ``templates``:
    zero-shot prompts, OpenAI's 80 (the paper) or three short ones; ``knn_k``/``knn_temperature``: the paper's."""

    roots_file: str = ""
    roots: dict[str, str] = {}
    variants: list[str] = list(VARIANTS)
    batch_size: int = 64
    templates: Literal["openai80", "short"] = "openai80"
    knn_k: int = 21
    knn_temperature: float = 0.1

    @field_validator("variants")
    @classmethod
    def _known(cls, variants: list[str]) -> list[str]:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        return variants

    def resolved_roots(self) -> dict[str, str]:
        path = self.roots_file or os.environ.get(ROOTS_ENV, "")
        return {**(read_roots(path) if path else {}), **parse_roots(self.roots)}

    def options(self) -> SuiteOptions:
        templates = OPENAI_TEMPLATES if self.templates == "openai80" else SHORT_TEMPLATES
        return SuiteOptions(templates=templates, knn_k=self.knn_k, knn_temperature=self.knn_temperature)


class Table1Settings(dg.Config):
    """The paired bootstrap of the differences to the baseline; defaults as the evaluation report's."""

    bootstrap_resamples: int = Field(default=1000, ge=1, le=100_000)
    bootstrap_seed: int = 0
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)

    def bootstrap(self) -> BootstrapConfig:
        return BootstrapConfig(self.bootstrap_resamples, self.confidence, self.bootstrap_seed)


def variant_embedder(artifacts: ArtifactStore, variant: str, compute: ComputeResource, batch_size: int) -> SuiteEmbedder:
    """An embedder of ``variant``'s published weights, its embeddings kept in ``<cache>/suite-embeddings``."""
    bundle = load_model(variant_spec(artifacts, variant, compute.cache, MODEL_ROOT), cache_dir=compute.cache,
                        device=compute.device)
    return SuiteEmbedder(bundle, device=compute.device, batch_size=batch_size,
                         cache_dir=compute.cache / "suite-embeddings")


@dg.asset(group_name=GROUP, deps=[base_model, *TRAINING_ASSETS], partitions_def=BENCHMARK_COLUMNS, code_version="2",
          pool=GPU_POOL, kinds={"pytorch"})
def benchmark_suite(context: dg.AssetExecutionContext, config: SuiteSettings, compute: ComputeResource,
                    store: ArtifactStoreResource) -> dg.MaterializeResult:
    """One Table 1 column (the partition) for every variant, from the benchmark's official layout.

    A column whose root is not configured materialises as ``skipped: <what to set>`` (the other columns
    are unaffected); a configured root without the official layout fails with the loader's message. The
    per-query scores are written before the JSON, which a reader takes as the column's result.
    """
    compute.setup_torch()
    artifacts = store.store()
    roots, options = config.resolved_roots(), config.options()
    embedders = {variant: partial(variant_embedder, artifacts, variant, compute, config.batch_size)
                 for variant in config.variants}
    rows = []
    for key in context.partition_keys:
        started = time.perf_counter()
        result = evaluate_column(get_column(key), roots, embedders, options, log=context.log.info)
        if not result.skipped:
            result = replace(result, model_keys={v: served_model_key(artifacts, v) for v in config.variants})
            artifacts.write_parquet(scores_key(key), scores_frame([result]))
        artifacts.write_json(result_key(key), json_safe(result.to_json()))
        rows.append({"column": key, "seconds": round(time.perf_counter() - started, 1),
                     **({"skipped": result.skipped} if result.skipped else
                        {v: round(result.headline(v), 4) for v in result.metrics})})
    metadata = {"columns": md_table(rows), "uri": artifacts.url(result_key(context.partition_keys[0]))}
    skipped = [row["skipped"] for row in rows if "skipped" in row]
    if skipped:
        metadata["skipped"] = "skipped: " + " | ".join(skipped)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(group_name=GROUP, deps=[benchmark_suite], code_version="2", kinds={"duckdb"})
def table1_report(context: dg.AssetExecutionContext, config: Table1Settings,
                  store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Table 1 (markdown) over the columns evaluated so far: each variant's difference to the baseline with
    its 95% paired-bootstrap interval, and the paper's figures with the difference when the base model is one
    the paper used. Results of older weights than the published ones are left out and listed (re-materialise
    their partitions); a column without matching per-query scores keeps its values, without intervals."""
    artifacts = store.store()
    results, stale, unscored = [], {}, {}
    for column in COLUMN_NAMES:
        if not artifacts.exists(result_key(column)):
            continue
        result = ColumnResult.from_json(artifacts.read_json(result_key(column)))
        changed = [v for v, key in result.model_keys.items() if key != served_model_key(artifacts, v)]
        if changed:
            stale[column] = f"stale: evaluated with older weights of {', '.join(changed)}; re-materialise the partition"
            continue
        results.append(_with_stored_scores(artifacts, result, unscored))
    missing = {c: "not materialised yet" for c in COLUMN_NAMES
               if c not in stale and all(r.column != c for r in results)}
    spec = base_spec(artifacts)
    base = paper.paper_base(spec.name, spec.pretrained)
    intervals = table_intervals(results, config=config.bootstrap())
    values = table_values(results)  # rows in pipeline order (the stored JSON has its keys sorted)
    table = build_table1({v: values[v] for v in VARIANTS if v in values}, paper=paper.paper_rows(base) if base else None,
                         paper_source=paper.SOURCE, skipped={**skipped_reasons(results), **stale, **missing},
                         intervals=intervals)
    title = f"Table 1 — base model {spec.name} ({spec.pretrained or 'no tag'})" + (f", paper: {base}" if base else "")
    notes = "".join(f"\n- {why}" for why in unscored.values())
    markdown = f"{title}\n\n{table.markdown()}" + (f"\n\nWithout intervals:{notes}" if notes else "")
    artifacts.write_bytes(TABLE1_MD, markdown.encode())
    artifacts.write_json(TABLE1_JSON, json_safe({"base_model": {"name": spec.name, "pretrained": spec.pretrained},
                                                 "paper_base": base, "columns": [c.name for c in table.columns],
                                                 "rows": table.rows, "skipped": table.skipped,
                                                 "bootstrap": {"resamples": config.bootstrap_resamples,
                                                               "confidence": config.confidence,
                                                               "seed": config.bootstrap_seed,
                                                               "method": "paired percentile bootstrap over queries"},
                                                 "without_intervals": unscored}))
    context.log.info(f"Table 1 over {len(table.columns)} of {len(COLUMN_NAMES)} columns")
    return dg.MaterializeResult(metadata={"table1": dg.MetadataValue.md(markdown), "columns": len(table.columns),
                                          "partial": table.partial, "uri": artifacts.url(TABLE1_MD)})


def _with_stored_scores(artifacts: ArtifactStore, result: ColumnResult, unscored: dict[str, str]) -> ColumnResult:
    """``result`` with its stored per-query scores; where they are missing or belong to another evaluation, the
    result as it is and the reason in ``unscored``."""
    if result.skipped:
        return result
    if not artifacts.exists(scores_key(result.column)):
        unscored[result.column] = f"{result.column}: no per-query scores stored; re-materialise the partition"
        return result
    try:
        return attach_scores([result], artifacts.read_parquet(scores_key(result.column)))[0]
    except ValueError as exc:
        unscored[result.column] = str(exc)
        return result
