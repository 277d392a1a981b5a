"""Run configuration users edit in the launchpad. Defaults are the recipes of docs/method.md.

Each config validates its fields (errors name the field and the allowed values) and
converts itself to the core library's frozen dataclasses.
"""

from typing import Literal

import dagster as dg
from pydantic import Field, model_validator

from clipopt_core.train.config import MiningConfig
from clipopt_core.evaluate.protocol import OPENAI_TEMPLATES, EvalConfig
from clipopt_core.serve.index import IndexSpec
from clipopt_core.models.loading import ModelSpec
from clipopt_core.train.config import RealignConfig, RetrievalConfig
from clipopt_core.train.config import TrainConfig

SHORT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an icon of {}.")


class BaseModelConfig(dg.Config):
    """open_clip name + pretrained tag/file, ``local-dir:/folder``, ``hf-hub:org/repo`` or ``starter``."""

    name: str = "starter"
    pretrained: str | None = None
    image_size: int | None = Field(default=None, ge=16, le=1024)

    def spec(self) -> ModelSpec:
        return ModelSpec(self.name, self.pretrained, self.image_size)


class SplitConfig(dg.Config):
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.4, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}")
        return self


class MiningSettings(dg.Config):
    """Caption mining; ``threshold`` None picks the ``threshold_quantile`` of top-1 similarities."""

    top_k: int = Field(default=20, ge=1, le=1000)
    threshold: float | None = Field(default=0.27, ge=-1.0, le=1.0)
    threshold_quantile: float = Field(default=0.5, gt=0.0, lt=1.0)

    def core(self) -> MiningConfig:
        return MiningConfig(self.top_k, self.threshold, self.threshold_quantile)


class _TrainSettings(dg.Config):
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=256, ge=2)
    lr: float = Field(default=1e-6, gt=0.0)
    lr_floor: float = Field(default=1e-7, ge=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    grad_clip: float = Field(default=1.0, gt=0.0)
    accumulation_steps: int = Field(default=1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    eval_every_steps: int = Field(default=50, ge=1)
    patience: int = Field(default=50, ge=1)
    checkpoint_every_steps: int = Field(default=100, ge=1)
    validate_at_start: bool = True

    def train(self, **overrides: object) -> TrainConfig:
        fields = {name: getattr(self, name) for name in _TrainSettings.model_fields}
        return TrainConfig(**{**fields, **overrides})


class RetrievalSettings(_TrainSettings):
    """Stage 1 (ArcMargin); ``mc_weight`` > 0 only for MCIP."""

    proxy_lr_multiplier: float = Field(default=100.0, gt=0.0)
    arc_scale: float = Field(default=30.0, gt=0.0)
    arc_margin: float = Field(default=0.1, ge=0.0, lt=1.5)
    freeze_norm: bool = True
    projector: Literal["train", "reattach"] = "train"
    num_workers: int = Field(default=0, ge=0)

    def core(self, mc_weight: float = 0.0, max_negative_weight: float = 0.1) -> RetrievalConfig:
        return RetrievalConfig(self.train(), self.proxy_lr_multiplier, self.arc_scale, self.arc_margin, mc_weight,
                               max_negative_weight, self.freeze_norm, self.projector, self.num_workers)


class McipSettings(RetrievalSettings):
    mc_weight: float = Field(default=0.25, gt=0.0, lt=1.0)
    max_negative_weight: float = Field(default=0.1, ge=0.0)

    def core(self, mc_weight: float | None = None, max_negative_weight: float | None = None) -> RetrievalConfig:
        return super().core(self.mc_weight, self.max_negative_weight)


class RealignSettings(_TrainSettings):
    """Stage 2 (docs/method.md#realignment: LR 1e-5, wd 0.2, β 0.9/0.98, eps 1e-6; authors' batch 32k)."""

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32768, ge=2)
    lr: float = Field(default=1e-5, gt=0.0)
    lr_floor: float = Field(default=0.0, ge=0.0)
    weight_decay: float = Field(default=0.2, ge=0.0)
    eval_every_steps: int = Field(default=100, ge=1)
    last_blocks: int = Field(default=1, ge=0)

    def core(self) -> RealignConfig:
        return RealignConfig(self.train(betas=(0.9, 0.98), eps=1e-6), self.last_blocks)


class EvalSettings(dg.Config):
    """Report settings and the thresholds of its checks.

    ``templates``: ``openai80`` (OpenAI's ImageNet prompts) or ``short`` (3 prompts; faster on CPU).
    ``alignment_tolerance``: how far T2I R@5 / zero-shot top-1 may fall below the baseline.
    ``min_i2i_gain``: the served variant's I2I mAP must exceed the baseline's by more than this.
    """

    templates: Literal["openai80", "short"] = "openai80"
    serve_variant: Literal["baseline", "stage1", "2sft", "mcip", "mcip_realign"] = "mcip_realign"
    alignment_tolerance: float = Field(default=0.01, ge=0.0, le=1.0)
    min_i2i_gain: float = Field(default=0.0, ge=-1.0, le=1.0)

    def core(self) -> EvalConfig:
        return EvalConfig(templates=OPENAI_TEMPLATES if self.templates == "openai80" else SHORT_TEMPLATES)


class IndexSettings(dg.Config):
    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    memory_budget_gib: float = Field(default=8.0, gt=0.0)
    target_recall: float = Field(default=0.95, gt=0.0, le=1.0)

    def core(self) -> IndexSpec:
        return IndexSpec(kind=self.kind, memory_budget_bytes=int(self.memory_budget_gib * 2**30),
                         target_recall=self.target_recall)
