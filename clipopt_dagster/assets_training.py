"""Training assets: stage-1 retrieval encoder, MCIP encoder, and their text realignments."""

import dagster as dg
import polars as pl

from clipopt_core.runtime.locks import work_dir_lock
from clipopt_core.models.loading import ModelSpec
from clipopt_core.data.captions import realign_pairs
from clipopt_core.train.runner import StageOutput, config_hash, train_realign, train_retrieval
from clipopt_core.runtime.storage import COMPLETE_MARKER
from clipopt_core.layout import Keys, base_spec, stage_spec
from clipopt_dagster._helpers import GPU_POOL, TRAINING_RETRY, md_table, step_logger
from clipopt_dagster.assets_data import base_model, caption_corpus, image_splits, pseudo_captions
from clipopt_dagster.configs import McipSettings, RealignSettings, RetrievalSettings
from clipopt_dagster.launchers import stage_request
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource

GROUP = "training"
COMMON = dict(group_name=GROUP, code_version="1", pool=GPU_POOL, retry_policy=TRAINING_RETRY, kinds={"pytorch"})


def _publish(context: dg.AssetExecutionContext, store: ArtifactStoreResource, name: str,
             output: StageOutput) -> dg.MaterializeResult:
    artifacts = store.store()
    hashes = artifacts.put_dir(output.checkpoint, Keys.model(name))
    history = [{"step": e["step"], "val_score": e["val_score"]} for e in output.fit.history][-20:]
    return dg.MaterializeResult(metadata={
        "uri": artifacts.url(Keys.model(name)),
        "weights_sha256": hashes.get("open_clip_model.safetensors", ""),
        "best_val_score": round(output.fit.best_score, 4), "best_step": output.fit.best_step,
        "steps": output.fit.steps, "stopped_early": output.fit.stopped_early,
        "train_seconds": round(output.fit.seconds, 1), "validation_history": md_table(history, 4),
        **{k: v for k, v in output.summary.items() if isinstance(v, (int, str))},
    })


def _retrieval(context: dg.AssetExecutionContext, name: str, settings: RetrievalSettings, compute: ComputeResource,
               store: ArtifactStoreResource, with_captions: bool) -> dg.MaterializeResult:
    compute.setup_torch()
    artifacts = store.store()
    spec = base_spec(artifacts)
    splits = artifacts.read_parquet(Keys.splits)
    captions = artifacts.read_parquet(Keys.pseudo_captions) if with_captions else None
    core = settings.core()
    work = compute.cache / "work" / name / config_hash(spec, core, artifacts.base_url, splits.height)
    context.log.info(f"training {name} in {work} (resumes from its last checkpoint if interrupted)")
    if compute.launcher and compute.launcher.launches:  # a Pipes child (subprocess, torchrun, k8s) trains and publishes
        request = stage_request("mcip" if with_captions else "retrieval", name, store, compute, core, work, model=spec)
        return compute.launcher.launch(context, request, store)
    with work_dir_lock(work, on_wait=context.log.warning):  # a same-config run elsewhere: wait, then resume
        output = train_retrieval(spec, splits, core, work, cache_dir=compute.cache, stage=name,
                                 pseudo_captions=captions, device=compute.device, log=step_logger(context))
        return _publish(context, store, name, output)


def _realign(context: dg.AssetExecutionContext, name: str, encoder: str, settings: RealignSettings,
             compute: ComputeResource, store: ArtifactStoreResource) -> dg.MaterializeResult:
    compute.setup_torch()
    artifacts = store.store()
    image_size = base_spec(artifacts).image_size
    core = settings.core()
    work = compute.cache / "work" / name / config_hash(core, artifacts.read_json(f"{Keys.model(encoder)}/{COMPLETE_MARKER}"))
    if compute.launcher and compute.launcher.launches:  # a Pipes child downloads the encoder, trains and publishes
        request = stage_request("realign", name, store, compute, core, work, encoder=encoder, image_size=image_size)
        return compute.launcher.launch(context, request, store)
    spec: ModelSpec = stage_spec(artifacts, encoder, compute.cache, image_size)
    splits = artifacts.read_parquet(Keys.splits)
    pairs = realign_pairs(artifacts.read_parquet(Keys.caption_pairs), splits)
    with work_dir_lock(work, on_wait=context.log.warning):  # a same-config run elsewhere: wait, then resume
        output = train_realign(spec, pairs, splits.filter(pl.col("split") == "val"), core, work,
                               cache_dir=compute.cache, stage=name, device=compute.device, log=step_logger(context))
        return _publish(context, store, name, output)


@dg.asset(deps=[base_model, image_splits], **COMMON)
def retrieval_encoder(context: dg.AssetExecutionContext, config: RetrievalSettings, compute: ComputeResource,
                      store: ArtifactStoreResource) -> dg.MaterializeResult:
    """Stage 1: the image tower fine-tuned with ArcMargin on the training classes (text tower untouched)."""
    return _retrieval(context, "retrieval_encoder", config, compute, store, with_captions=False)


@dg.asset(deps=[base_model, image_splits, pseudo_captions], **COMMON)
def mcip_encoder(context: dg.AssetExecutionContext, config: McipSettings, compute: ComputeResource,
                 store: ArtifactStoreResource) -> dg.MaterializeResult:
    """MCIP: image tower + projector trained with 0.75·ArcMargin + 0.25·MCArcMargin against the frozen text tower."""
    return _retrieval(context, "mcip_encoder", config, compute, store, with_captions=True)


@dg.asset(deps=[retrieval_encoder, caption_corpus], **COMMON)
def realigned_2sft(context: dg.AssetExecutionContext, config: RealignSettings, compute: ComputeResource,
                   store: ArtifactStoreResource) -> dg.MaterializeResult:
    """2SFT stage 2: the text tower's last blocks realigned (InfoNCE) to the frozen stage-1 image space."""
    return _realign(context, "realigned_2sft", "retrieval_encoder", config, compute, store)


@dg.asset(deps=[mcip_encoder, caption_corpus], **COMMON)
def realigned_mcip(context: dg.AssetExecutionContext, config: RealignSettings, compute: ComputeResource,
                   store: ArtifactStoreResource) -> dg.MaterializeResult:
    """MCIP + realignment: the optional stage 2 on top of the MCIP image tower."""
    return _realign(context, "realigned_mcip", "mcip_encoder", config, compute, store)
