"""Run configuration users edit in the launchpad.

The training and mining settings are *derived* from the core dataclasses
(:mod:`clipopt_core.train.config`): same fields, same defaults (the paper's recipe, see
docs/method.md), same ranges (:data:`clipopt_core.train.schema.RANGES`), and ``core()`` converts
through the one validating :func:`~clipopt_core.train.schema.stage_config`. Nothing here restates a default.
"""

import dataclasses
import typing
from typing import Any, ClassVar, Literal

import dagster as dg
import pydantic
from pydantic import Field, model_validator

from clipopt_core.evaluate.bootstrap import BootstrapConfig
from clipopt_core.evaluate.protocol import OPENAI_TEMPLATES, EvalConfig
from clipopt_core.models.loading import ModelSpec
from clipopt_core.registry import STAGES, VARIANTS
from clipopt_core.serve.index import IndexSpec
from clipopt_core.train.config import MiningConfig, TrainConfig
from clipopt_core.train.schema import (RANGES, StageConfig, default_config, field_types, flat_defaults, mining_config,
                                       stage_config)

SHORT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an icon of {}.")


class BaseModelConfig(dg.Config):
    """open_clip name + pretrained tag/file, ``local-dir:/folder``, ``hf-hub:org/repo`` or ``starter``."""

    name: str = "starter"
    pretrained: str | None = None
    image_size: int | None = Field(default=None, ge=16, le=1024)

    def spec(self) -> ModelSpec:
        return ModelSpec(self.name, self.pretrained, self.image_size)


class SplitConfig(dg.Config):
    """Class-disjoint image splits (``val_fraction``, ``test_fraction`` of the classes) and the class-free
    split of the caption corpus (``caption_val_fraction``, ``caption_test_fraction`` of its image/caption
    groups: held-out text→image pairs and realignment's selection set). One ``seed`` for both."""

    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.4, ge=0.0, lt=1.0)
    caption_val_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    caption_test_fraction: float = Field(default=0.3, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}")
        if self.caption_val_fraction + self.caption_test_fraction >= 1:
            raise ValueError("caption_val_fraction + caption_test_fraction must be < 1, got "
                             f"{self.caption_val_fraction + self.caption_test_fraction}")
        return self


def _launchpad_type(annotation: Any) -> Any:
    """The launchpad's type for a core field type: tuples become lists (Dagster config has no tuples)."""
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def _derived(name: str, core_type: type, defaults: dict[str, Any], doc: str, base: type[dg.Config]) -> type[dg.Config]:
    """A launchpad config class whose fields, types, defaults and ranges are the core dataclass's own."""
    types_ = field_types(core_type) | field_types(TrainConfig)
    fields = {field: (_launchpad_type(types_[field]),
                      Field(default=list(value) if isinstance(value, tuple) else value, **RANGES.get(field, {})))
              for field, value in defaults.items()}
    return pydantic.create_model(name, __base__=base, __doc__=doc, __module__=__name__, **fields)


class _StageSettingsBase(dg.Config):
    """Base of the generated stage settings: ``core()`` is the one conversion (:func:`stage_config`)."""

    kind: ClassVar[str]

    def settings(self) -> dict[str, Any]:
        """The flat settings as the core takes them (a :class:`~clipopt_core.train.job.StageRequest`'s)."""
        return self.model_dump()

    def core(self) -> StageConfig:
        return stage_config(self.kind, self.settings())

    @model_validator(mode="after")
    def _valid_in_core(self) -> "_StageSettingsBase":
        self.core()  # cross-field rules live in the core; the launchpad shows the same error
        return self


class _MiningSettingsBase(dg.Config):
    def core(self) -> MiningConfig:
        return mining_config(self.model_dump())


def _stage_settings(kind: str, name: str, doc: str) -> type[dg.Config]:
    core_type = type(default_config(kind))
    cls = _derived(name, core_type, flat_defaults(kind), doc, _StageSettingsBase)
    cls.kind = kind
    return cls


RetrievalSettings = _stage_settings("retrieval", "RetrievalSettings", "Stage 1 (ArcMargin): the paper's recipe by default.")
McipSettings = _stage_settings("mcip", "McipSettings", "MCIP (0.75·ArcMargin + 0.25·MCArcMargin): the paper's recipe.")
RealignSettings = _stage_settings("realign", "RealignSettings",
                                  "Stage 2 realignment (LR 1e-5, wd 0.2, β 0.9/0.98, eps 1e-6; authors' batch 32k).")
STAGE_SETTINGS: dict[str, type[dg.Config]] = {"retrieval": RetrievalSettings, "mcip": McipSettings,
                                              "realign": RealignSettings}
MiningSettings = _derived("MiningSettings", MiningConfig, {f.name: getattr(MiningConfig(), f.name)
                                                           for f in dataclasses.fields(MiningConfig)},
                          "Caption mining; ``threshold`` null picks the ``threshold_quantile`` of top-1 similarities.",
                          _MiningSettingsBase)


class EvalSettings(dg.Config):
    """Report settings and the thresholds of its checks (they decide on paired-bootstrap intervals).

    ``templates``: ``openai80`` (OpenAI's ImageNet prompts) or ``short`` (3 prompts; faster on CPU).
    ``alignment_tolerance``: ``alignment_preserved`` blocks when T2I R@5 or zero-shot top-1 of the served
    variant falls *significantly* below the baseline (the delta's upper interval bound < 0) *and* by
    more than this.
    ``min_i2i_gain``: ``retrieval_improved`` passes when the lower interval bound of the I2I mAP delta
    exceeds this.
    ``bootstrap_resamples``/``bootstrap_seed``/``confidence``: the paired bootstrap over queries.
    ``gallery_queries``: held-out captions shown in the text→image gallery.
    ``max_image_queries``: unset = every test image is a query of I2I mAP/R@1/kNN; a number = a seeded
    sample of that many query images, each ranked against the whole split (very large test sets).
    """

    templates: Literal["openai80", "short"] = "openai80"
    serve_variant: Literal[VARIANTS] = "mcip_realign"  # type: ignore[valid-type]
    alignment_tolerance: float = Field(default=0.01, ge=0.0, le=1.0)
    min_i2i_gain: float = Field(default=0.0, ge=-1.0, le=1.0)
    bootstrap_resamples: int = Field(default=1000, ge=1, le=100_000)
    bootstrap_seed: int = 0
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    gallery_queries: int = Field(default=4, ge=0, le=50)
    max_image_queries: int | None = Field(default=None, ge=1)

    def core(self) -> EvalConfig:
        return EvalConfig(templates=_templates(self.templates), gallery_queries=self.gallery_queries,
                          max_image_queries=self.max_image_queries)

    def bootstrap(self) -> BootstrapConfig:
        return BootstrapConfig(self.bootstrap_resamples, self.confidence, self.bootstrap_seed)


class ReleaseSettings(dg.Config):
    """``tolerance``: a challenger is refused when a gate metric (I2I mAP, T2I R@5, zero-shot top-1) is
    significantly below the champion's (upper bound of the paired interval < 0) by more than this."""

    tolerance: float = Field(default=0.0, ge=0.0, le=1.0)


class IndexSettings(dg.Config):
    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    memory_budget_gib: float = Field(default=8.0, gt=0.0)
    target_recall: float = Field(default=0.95, gt=0.0, le=1.0)

    def core(self) -> IndexSpec:
        return IndexSpec(kind=self.kind, memory_budget_bytes=int(self.memory_budget_gib * 2**30),
                         target_recall=self.target_recall)


def _templates(name: str) -> tuple[str, ...]:
    return OPENAI_TEMPLATES if name == "openai80" else SHORT_TEMPLATES


class _SeedSweepBase(dg.Config):
    """Seeds to train, the zero-shot prompts, and (fields named after the stages) each stage's settings."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    templates: Literal["openai80", "short"] = "openai80"

    def eval_config(self) -> EvalConfig:
        return EvalConfig(templates=_templates(self.templates))

    def stage_settings(self, asset: str, seed: int) -> dict[str, Any]:
        """``asset``'s settings with its training seed replaced by ``seed``."""
        return {**getattr(self, asset).settings(), "seed": seed}


SeedSweepSettings = pydantic.create_model(
    "SeedSweepSettings", __base__=_SeedSweepBase, __module__=__name__,
    **{stage.asset: (STAGE_SETTINGS[stage.kind], Field(default_factory=STAGE_SETTINGS[stage.kind])) for stage in STAGES})
