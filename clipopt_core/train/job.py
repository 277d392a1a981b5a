"""A training stage as a self-contained job: inputs from the artifact store, the checkpoint published back.

What a launched child runs (:mod:`clipopt_dagster.pipes_child` under Dagster Pipes; the same code in
a subprocess, under ``torchrun`` or in a Kubernetes pod): it needs only a :class:`StageRequest`
(JSON, in ``$CLIPOPT_STAGE_REQUEST`` or a file) and access to the store. It reads the splits (and
the pseudo-captions or caption pairs) from the store, trains through :mod:`clipopt_core.train.runner`
exactly like the in-process asset, publishes ``models/<asset>`` and returns the asset's metadata.

Store credentials never travel in the request: S3 keys come from the environment (``AWS_*``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl

from clipopt_core.runtime import distributed
from clipopt_core.layout import Keys, stage_spec
from clipopt_core.models.loading import ModelSpec
from clipopt_core.data.captions import realign_pairs
from clipopt_core.train.runner import StageOutput, train_realign, train_retrieval
from clipopt_core.train.config import RealignConfig, RetrievalConfig
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.train.config import TrainConfig

REQUEST_ENV = "CLIPOPT_STAGE_REQUEST"
STAGES = ("retrieval", "mcip", "realign")


@dataclass(frozen=True)
class StageRequest:
    """Everything a child needs to train one stage.

    ``model``: :class:`ModelSpec` fields of the base model (retrieval, mcip). ``encoder``: the asset
    whose published checkpoint realign starts from (with ``image_size``). ``config``: the fields of
    :class:`RetrievalConfig` / :class:`RealignConfig` (``train`` nested). ``work_dir``/``cache_dir``:
    local to the child (resumable, named by the config hash as in-process).
    """

    stage: str
    asset: str
    store_url: str
    config: dict[str, Any]
    work_dir: str
    cache_dir: str
    model: dict[str, Any] | None = None
    encoder: str | None = None
    image_size: int | None = None
    endpoint_url: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        if (self.stage == "realign") != (self.encoder is not None) or (self.stage != "realign") != (self.model is not None):
            raise ValueError("retrieval/mcip requests need 'model', realign requests need 'encoder' (and not the other)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StageRequest":
        return cls(**json.loads(text))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "StageRequest":
        """From ``path`` if given, else from ``$CLIPOPT_STAGE_REQUEST``."""
        if path is not None:
            return cls.from_json(Path(path).read_text())
        if REQUEST_ENV not in os.environ:
            raise ValueError(f"no stage request: pass --request FILE or set ${REQUEST_ENV}")
        return cls.from_json(os.environ[REQUEST_ENV])

    def store(self) -> ArtifactStore:
        options: dict[str, Any] = {}
        if self.store_url.startswith("s3://") and self.endpoint_url:
            options["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        return ArtifactStore(self.store_url, options)


def train_config(fields: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in fields.items()})


def retrieval_config(fields: dict[str, Any]) -> RetrievalConfig:
    return RetrievalConfig(**{**fields, "train": train_config(fields.get("train", {}))})


def realign_config(fields: dict[str, Any]) -> RealignConfig:
    return RealignConfig(**{**fields, "train": train_config(fields.get("train", {}))})


def run_stage(request: StageRequest, *, log: Callable[[dict[str, float]], None] = lambda event: None) -> dict[str, Any] | None:
    """Train ``request``'s stage and publish its checkpoint; returns the asset metadata on rank 0, else ``None``."""
    device = distributed.setup(request.device)
    store = request.store()
    work, cache = Path(request.work_dir), Path(request.cache_dir)
    splits = store.read_parquet(Keys.splits)
    if request.stage == "realign":
        distributed.run_on_main(stage_spec, store, request.encoder, cache, request.image_size)  # one download per node
        spec = stage_spec(store, request.encoder, cache, request.image_size)
        pairs = realign_pairs(store.read_parquet(Keys.caption_pairs), splits)
        output = train_realign(spec, pairs, splits.filter(pl.col("split") == "val"), realign_config(request.config), work,
                               cache_dir=cache, stage=request.asset, device=device, log=log)
    else:
        captions = store.read_parquet(Keys.pseudo_captions) if request.stage == "mcip" else None
        output = train_retrieval(ModelSpec(**request.model), splits, retrieval_config(request.config), work,
                                 cache_dir=cache, stage=request.asset, pseudo_captions=captions, device=device, log=log)
    if not distributed.is_main():
        return None
    hashes = store.put_dir(output.checkpoint, Keys.model(request.asset))
    return {**stage_metadata(store, request.asset, output, hashes), "world_size": distributed.world_size()}


def stage_metadata(store: ArtifactStore, asset: str, output: StageOutput, hashes: dict[str, str]) -> dict[str, Any]:
    """The metadata the training assets report (``validation_history``: the last 20 validations as rows)."""
    return {
        "uri": store.url(Keys.model(asset)),
        "weights_sha256": hashes.get("open_clip_model.safetensors", ""),
        "best_val_score": round(output.fit.best_score, 4), "best_step": output.fit.best_step,
        "steps": output.fit.steps, "stopped_early": output.fit.stopped_early,
        "train_seconds": round(output.fit.seconds, 1),
        "validation_history": [{"step": e["step"], "val_score": e["val_score"]} for e in output.fit.history][-20:],
        **{k: v for k, v in output.summary.items() if isinstance(v, (int, str))},
    }
