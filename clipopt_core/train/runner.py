"""Train one stage from loaded inputs: model, datasets, task, :func:`~clipopt_core.train.loop.fit`, export.

Called by :func:`clipopt_core.train.job.run_stage` (which reads the inputs from the store, names the
work folder by the stage's identity, holds its lock and publishes the result). Each function
resumes from ``work_dir`` when an earlier attempt was interrupted and exports a checkpoint folder
that plain open_clip loads. No orchestration code lives here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import polars as pl
import torch

from clipopt_core.runtime import distributed
from clipopt_core.data.datasets import ImageDataset, encode_labels, train_transform
from clipopt_core.data.sources import source_counts, source_weights
from clipopt_core.models.encode import embed_images, embed_texts
from clipopt_core.evaluate.protocol import caption_benchmark, validation_caption_t2i, validation_map, validation_subset
from clipopt_core.models.loading import ClipBundle, ModelSpec, export_checkpoint, load_model
from clipopt_core.train.embedding_cache import realign_pair_cache
from clipopt_core.train.tasks import RealignTask, RetrievalTask
from clipopt_core.train.config import RealignConfig, RetrievalConfig
from clipopt_core.train.loop import FitResult, fit

EventLog = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class StageOutput:
    checkpoint: Path
    fit: FitResult
    summary: dict[str, Any]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global torch RNG seeded by ``seed``, restoring the caller's state after.

    Task construction draws random initial weights (ArcMargin proxies) from the global RNG,
    which PyTorch seeds randomly per process: without this the same config trained in two
    processes starts from different proxies and ends with different weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train_retrieval(base_spec: ModelSpec, splits: pl.DataFrame, config: RetrievalConfig, work_dir: Path, *,
                    cache_dir: Path, stage: str, pseudo_captions: pl.DataFrame | None = None,
                    device: str = "cpu", log: EventLog = lambda e: None, identity: str = "") -> StageOutput:
    """Stage 1 (``mc_weight`` 0) or MCIP (``mc_weight`` > 0, needs ``pseudo_captions`` for the training images).

    ``identity`` (:func:`clipopt_core.train.identity.stage_identity`) is recorded in the checkpoint's sidecar.
    """
    bundle = load_model(base_spec, cache_dir=cache_dir, device=device)
    train = splits.filter(pl.col("split") == "train")
    val = splits.filter(pl.col("split") == "val")
    label_ids, class_names = encode_labels(train["label"].to_list())
    dataset = ImageDataset(train["uri"].to_list(), label_ids,
                           train_transform(bundle.image_size, bundle.mean, bundle.std, bundle.interpolation))
    caption_embeddings, captions_of = None, None
    if config.mc_weight:
        caption_embeddings, captions_of = _caption_matrix(bundle, train, pseudo_captions, device)
    validate = validation_map(val, device=device, max_images=config.val_max_images, seed=config.train.seed)
    with seeded(config.train.seed):  # the ArcMargin proxies' init must not depend on the process' RNG state
        task = RetrievalTask(bundle, dataset, len(class_names), config, validate, caption_embeddings, captions_of,
                             source_weights(train))
    summary = {"stage": stage, "train_images": train.height, "train_classes": len(class_names),
               "val_images": val.height, "config": asdict(config), "identity": identity,
               "per_source": source_counts(train).to_dicts()}
    result = fit(task, config.train, work_dir, device=device, log=log)
    return _export(bundle, work_dir, summary, result)


def train_realign(encoder_spec: ModelSpec, pairs: pl.DataFrame | pl.LazyFrame, val: pl.DataFrame, config: RealignConfig, work_dir: Path, *,
                  cache_dir: Path, stage: str, device: str = "cpu", log: EventLog = lambda e: None,
                  identity: str = "") -> StageOutput:
    """Stage 2 on top of a fine-tuned image tower: pairs (``uri``, ``caption``) → realigned text tail.

    ``pairs`` may be lazy (a parquet scan): it is read in slices, never whole. Image embeddings of
    the pairs are computed once with the frozen tower (eval transform),
    grouped by caption and cached on disk under ``cache_dir``, keyed by the tower's weights and the
    pairs' content (:func:`~clipopt_core.train.embedding_cache.realign_pair_cache`): every step, and
    every later run with the same tower and pairs, reads them from there batch by batch, so the
    stage costs text-tower compute only and its memory does not grow with the pairs. ``val``
    (``uri``, ``caption``): the held-out pairs that select the checkpoint (mean T2I R@1/5/10,
    every caption a query), e.g. :func:`~clipopt_core.data.captions.realignment_selection_pairs`, or a
    seeded subset of whole images when it has more than ``config.val_max_pairs`` pairs.
    """
    bundle = load_model(encoder_spec, cache_dir=cache_dir, device=device)
    corpus = realign_pair_cache(bundle, pairs, cache_dir, device=device)
    benchmark = caption_benchmark(validation_subset(val, config.val_max_pairs, config.train.seed, by="uri"))
    val_embeddings = embed_images(bundle, benchmark.uris, device=device)
    with seeded(config.train.seed):
        task = RealignTask(bundle, corpus, None, config, validation_caption_t2i(val_embeddings, benchmark, device=device))
    summary = {"stage": stage, "pairs": corpus.pairs, "distinct_captions": len(corpus),
               "val_queries": len(benchmark.texts), "config": asdict(config), "identity": identity}
    result = fit(task, config.train, work_dir, device=device, log=log)
    task.finish()
    return _export(bundle, work_dir, summary, result)


def _caption_matrix(bundle: ClipBundle, train: pl.DataFrame, pseudo: pl.DataFrame | None,
                    device: str) -> tuple[torch.Tensor, list[list[int]]]:
    """Frozen text embeddings [P, D] of the distinct pseudo-captions + each train row's caption ids.

    Raises ``ValueError`` when no training image has a pseudo-caption: MCIP would silently train as
    stage 1 (with a 0.75-weighted loss), so the error says which mining settings to change.
    """
    owners = set(train["image_id"].to_list())
    pseudo = (pseudo if pseudo is not None else pl.DataFrame(schema={"image_id": pl.String, "caption": pl.String,
                                                                      "rank": pl.Int64}))
    pseudo = pseudo.filter(pl.col("image_id").is_in(owners))
    if pseudo.height == 0:
        raise ValueError("MCIP has no pseudo-captions for any of its training images: lower pseudo_captions' "
                         "threshold (or set it to null to take threshold_quantile), raise top_k, or give "
                         "the mining pool more captions, then re-materialise pseudo_captions")
    texts = sorted(set(pseudo["caption"].to_list()))
    lookup = {text: number for number, text in enumerate(texts)}
    owned: dict[str, list[int]] = {}
    for image_id, caption in pseudo.sort("image_id", "rank").select("image_id", "caption").iter_rows():
        owned.setdefault(image_id, []).append(lookup[caption])
    embeddings = embed_texts(bundle, texts, device=device) if texts else torch.empty(0, bundle.embed_dim)
    return embeddings, [owned.get(image_id, []) for image_id in train["image_id"].to_list()]


def _export(bundle: ClipBundle, work_dir: Path, summary: dict[str, Any], result: FitResult) -> StageOutput:
    # no wall-clock fields: re-running a finished stage must publish the same bytes (the next
    # stage's identity includes this checkpoint's weights hash)
    history = [{"step": e["step"], "val_score": e["val_score"]} for e in result.history]
    sidecar = {**summary, "best_val_score": result.best_score, "best_step": result.best_step, "steps": result.steps,
               "stopped_early": result.stopped_early, "validation_history": history}
    distributed.run_on_main(export_checkpoint, bundle, work_dir / "export", sidecar)  # rank 0 writes under torchrun
    return StageOutput(work_dir / "export", result, sidecar)
