"""The one way a training stage runs: :func:`run_stage` takes a :class:`StageRequest` from inputs in the
artifact store to a published checkpoint.

The Dagster assets (in process or through a Pipes child, under ``torchrun`` or in a Kubernetes pod) and
the CLI all build a request and call :func:`run_stage`; where it runs is the launcher's only concern.
A run is *input-addressed* (:mod:`clipopt_core.train.identity`): when the checkpoint already published
for the stage has the same identity it is reused without training; otherwise training starts in a
fresh work folder named by the identity (resuming there if an earlier attempt was interrupted).

Store credentials never travel in the request: S3 keys come from the environment (``AWS_*``).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from clipopt_core.data.captions import realign_pairs, realignment_selection_pairs
from clipopt_core.layout import MODEL_ROOT, Keys, base_spec, stage_spec
from clipopt_core.models.loading import SIDECAR_FILE, WEIGHTS_FILE, ModelSpec
from clipopt_core.registry import Stage, get_stage
from clipopt_core.runtime import distributed
from clipopt_core.runtime.locks import lock_timeout_s, work_dir_lock
from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore
from clipopt_core.train.identity import stage_identity
from clipopt_core.train.runner import StageOutput, train_realign, train_retrieval
from clipopt_core.train.schema import StageConfig, stage_config

REQUEST_ENV = "CLIPOPT_STAGE_REQUEST"
EventLog = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class StageRequest:
    """Everything needed to train one registered stage.

    ``asset``: a stage of :data:`clipopt_core.registry.STAGES` (asset or variant name). ``settings``: flat
    settings over the kind's defaults (:func:`clipopt_core.train.schema.stage_config`, validated here).
    ``cache_dir``: local to the process that trains (model cache, resumable work folders).
    ``model_root``: the store folder of the checkpoints it reads (realign's encoder) and publishes
    (``models``; a seed sweep uses one root per seed).
    """

    asset: str
    store_url: str
    cache_dir: str
    settings: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    endpoint_url: str | None = None
    model_root: str = MODEL_ROOT

    def __post_init__(self) -> None:
        object.__setattr__(self, "asset", get_stage(self.asset).asset)
        self.config()  # fail at request time, naming the bad field

    @property
    def stage(self) -> Stage:
        return get_stage(self.asset)

    def config(self) -> StageConfig:
        return stage_config(self.stage.kind, self.settings)

    def join_ranks(self) -> str:
        """Join the ``torchrun`` group, if any (collective timeout = the work-folder lock wait + 10 min,
        since followers wait in the first collective while rank 0 waits for the lock); returns the device."""
        return distributed.setup(self.device, timeout_s=lock_timeout_s() + 600.0)

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


@dataclass(frozen=True)
class StageInputs:
    """What a stage reads: the model it starts from, that model's weights hash, and its data frames."""

    start: ModelSpec
    start_weights: str
    splits: pl.DataFrame
    pseudo_captions: pl.DataFrame | None = None
    pairs: pl.LazyFrame | None = None
    val_pairs: pl.DataFrame | None = None

    def frames(self) -> dict[str, pl.DataFrame | pl.LazyFrame | None]:
        return {"splits": self.splits, "pseudo_captions": self.pseudo_captions, "pairs": self.pairs,
                "val_pairs": self.val_pairs}


def load_inputs(stage: Stage, store: ArtifactStore, cache: Path, root: str = MODEL_ROOT, *,
                scratch: Path) -> StageInputs:
    """Read a stage's inputs from the store (for realign: download the encoder checkpoint once per node).

    Realignment's corpus is never read whole: the caption pairs are downloaded to ``scratch`` (a
    folder that must live as long as the run) and the corpus (:func:`~clipopt_core.data.captions.realign_pairs`) is streamed from there into a parquet
    file that ``inputs.pairs`` scans lazily.
    """
    splits = store.read_parquet(Keys.splits)
    if stage.kind != "realign":
        base = store.read_json(Keys.base_model)
        captions = store.read_parquet(Keys.pseudo_captions) if stage.kind == "mcip" else None
        return StageInputs(base_spec(store), base.get("weights_sha256", ""), splits, pseudo_captions=captions)
    image_size = base_spec(store).image_size
    distributed.run_on_main(stage_spec, store, stage.encoder, cache, image_size, root)
    spec = stage_spec(store, stage.encoder, cache, image_size, root)
    weights = store.read_json(f"{Keys.model(stage.encoder, root)}/{COMPLETE_MARKER}")["files"][WEIGHTS_FILE]
    caption_pairs = pl.scan_parquet(store.get_file(Keys.caption_pairs, scratch / "caption_pairs.parquet"))
    corpus = scratch / "realign_pairs.parquet"
    realign_pairs(caption_pairs, splits).sink_parquet(corpus)
    return StageInputs(spec, weights, splits, pairs=pl.scan_parquet(corpus),
                       val_pairs=realignment_selection_pairs(caption_pairs, splits))


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def published_record(store: ArtifactStore, key: str) -> dict[str, Any] | None:
    """The sidecar of the checkpoint published at ``key`` (``None`` if there is no complete one)."""
    if not store.exists(f"{key}/{COMPLETE_MARKER}") or not store.exists(f"{key}/{SIDECAR_FILE}"):
        return None
    return {**store.read_json(f"{key}/{SIDECAR_FILE}"),
            "weights_sha256": store.read_json(f"{key}/{COMPLETE_MARKER}")["files"].get(WEIGHTS_FILE, "")}


def run_stage(request: StageRequest, *, store: ArtifactStore | None = None, log: EventLog = lambda event: None,
              on_wait: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Train ``request``'s stage (or reuse its published checkpoint) and publish it.

    Returns the asset metadata on rank 0 (``reused`` says whether training was skipped), ``None`` on
    other ranks. ``store``: an already configured store of ``request.store_url`` (in process, with the
    resource's credentials and retry settings); else :meth:`StageRequest.store` (credentials from
    ``AWS_*``). ``on_wait`` hears about a same-identity run elsewhere holding the work folder.
    """
    stage, config = request.stage, request.config()
    device = request.join_ranks()
    store, cache = store or request.store(), Path(request.cache_dir).expanduser()
    with tempfile.TemporaryDirectory(prefix="inputs-", dir=_mkdir(cache)) as scratch:
        inputs = load_inputs(stage, store, cache, request.model_root, scratch=Path(scratch))
        return _run_stage(request, stage, config, inputs, store, cache, device, log, on_wait)


def _run_stage(request: StageRequest, stage: Stage, config: StageConfig, inputs: StageInputs, store: ArtifactStore,
               cache: Path, device: str, log: EventLog, on_wait: Callable[[str], None] | None) -> dict[str, Any] | None:
    """:func:`run_stage` once its inputs are loaded: reuse the published checkpoint or train and publish."""
    identity = stage_identity(stage.kind, config, start_weights=inputs.start_weights, inputs=inputs.frames())
    key = Keys.model(stage.asset, request.model_root)
    published = published_record(store, key)
    if published is not None and published.get("identity") == identity:
        return _reused_metadata(store, key, stage, published) if distributed.is_main() else None
    work = cache / "work" / stage.asset / identity[:16]
    with work_dir_lock(work, on_wait=on_wait):  # a same-identity run elsewhere: wait, then resume its checkpoint
        output = _train(stage, config, inputs, work, cache=cache, device=device, log=log, identity=identity)
        if not distributed.is_main():
            return None
        hashes = store.put_dir(output.checkpoint, key)
    return {**stage_metadata(store, key, stage, output.summary), "weights_sha256": hashes.get(WEIGHTS_FILE, ""),
            "train_seconds": round(output.fit.seconds, 1), "reused": False, "world_size": distributed.world_size()}


def _train(stage: Stage, config: StageConfig, inputs: StageInputs, work: Path, *, cache: Path, device: str,
           log: EventLog, identity: str) -> StageOutput:
    common = dict(cache_dir=cache, stage=stage.asset, device=device, log=log, identity=identity)
    if stage.kind == "realign":
        return train_realign(inputs.start, inputs.pairs, inputs.val_pairs, config, work, **common)
    return train_retrieval(inputs.start, inputs.splits, config, work, pseudo_captions=inputs.pseudo_captions, **common)


def stage_metadata(store: ArtifactStore, key: str, stage: Stage, sidecar: dict[str, Any]) -> dict[str, Any]:
    """The metadata the training assets report, from a checkpoint's sidecar (scalars + the last 20 validations)."""
    history = [{"step": e["step"], "val_score": e["val_score"]} for e in sidecar.get("validation_history", [])][-20:]
    scalars = {k: v for k, v in sidecar.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    per_source = {"per_source": sidecar["per_source"]} if sidecar.get("per_source") else {}  # images/classes/share
    return {**scalars, **per_source, "uri": store.url(key), "variant": stage.variant,
            "stopped_early": bool(sidecar.get("stopped_early", False)), "validation_history": history}


def _reused_metadata(store: ArtifactStore, key: str, stage: Stage, published: dict[str, Any]) -> dict[str, Any]:
    return {**stage_metadata(store, key, stage, published), "weights_sha256": published["weights_sha256"], "reused": True,
            "world_size": distributed.world_size()}
