"""Training assets, one per registered stage (:data:`clipopt_core.registry.STAGES`).

Each asset builds a :class:`~clipopt_core.train.job.StageRequest` from its launchpad settings and
hands it to the compute resource's launcher, which decides where
:func:`~clipopt_core.train.job.run_stage` runs. The stage is input-addressed: an unchanged input
set reuses the published checkpoint (``reused`` in the metadata), anything else retrains.
"""

import dagster as dg

from clipopt_core.registry import STAGES, Stage
from clipopt_core.train.job import StageRequest
from clipopt_dagster._helpers import GPU_POOL, TRAINING_RETRY
from clipopt_dagster.assets_data import base_model, caption_corpus, image_splits, pseudo_captions
from clipopt_dagster.configs import STAGE_SETTINGS
from clipopt_dagster.launchers import TrainingLauncher
from clipopt_dagster.resources import ArtifactStoreResource, ComputeResource

GROUP = "training"


def _deps(stage: Stage) -> list[dg.AssetsDefinition | str]:
    if stage.kind == "realign":
        return [stage.encoder, caption_corpus, image_splits]
    return [base_model, image_splits, *([pseudo_captions] if stage.kind == "mcip" else [])]


def stage_request(stage: Stage, settings: dict, store: ArtifactStoreResource, compute: ComputeResource) -> StageRequest:
    """The request an asset hands to its launcher: where the store is, never its credentials."""
    return StageRequest(asset=stage.asset, store_url=store.base_url, endpoint_url=store.endpoint_url, settings=settings,
                        cache_dir=str(compute.cache), device=compute.device)


def training_asset(stage: Stage) -> dg.AssetsDefinition:
    """The asset that trains ``stage`` (its config class follows the stage's kind)."""
    settings_type = STAGE_SETTINGS[stage.kind]

    @dg.asset(name=stage.asset, deps=_deps(stage), description=stage.summary, group_name=GROUP, code_version="2",
              pool=GPU_POOL, retry_policy=TRAINING_RETRY, kinds={"pytorch"}, tags={"variant": stage.variant})
    def _train(context: dg.AssetExecutionContext, config: settings_type, compute: ComputeResource,  # type: ignore[valid-type]
               store: ArtifactStoreResource) -> dg.MaterializeResult:
        compute.setup_torch()
        request = stage_request(stage, config.settings(), store, compute)
        context.log.info(f"{stage.asset}: {stage.kind} stage, variant {stage.variant!r}")
        return (compute.launcher or TrainingLauncher()).run(context, request, store.store(), store.credentials_env())

    return _train


TRAINING_ASSETS = [training_asset(stage) for stage in STAGES]
