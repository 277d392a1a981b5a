"""Training configuration as data: the paper's recipe is in the defaults (docs/method.md).

Every layer reads these frozen dataclasses: the stage runner, the CLI's ``run.json`` and the
Dagster launchpad (whose config classes derive their fields and defaults from them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the stage-1 recipe (docs/method.md#stage-1).

    ``lr`` is the tower learning rate; each task scales its other groups from it (proxies 100×).
    ``eval_every_steps`` and ``checkpoint_every_steps`` count optimizer steps.
    ``patience`` counts evaluations without improvement; ``validate_at_start`` scores the starting
    weights first, so a run that only makes things worse returns the starting weights. ``precision`` is ``fp32``, ``bf16`` or
    ``fp16`` (autocast; fp16 uses a gradient scaler); reduced precision is used on CUDA only.
    ``grad_clip``: max L2 norm per clip group (each of the task's parameter groups: tower, proxies),
    ``None`` = no clipping. ``clip_mode``: ``unscaled`` clips the true gradients (after
    ``GradScaler.unscale_``); ``authors`` clips the fp16-*scaled* gradients as the authors' code
    does (docs/method.md#clipping); the two agree when no scaler is active (fp32/bf16).
    """

    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-6
    lr_floor: float = 1e-7
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    clip_mode: Literal["unscaled", "authors"] = "unscaled"
    accumulation_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    eval_every_steps: int = 50
    patience: int = 50
    checkpoint_every_steps: int = 100
    max_steps: int | None = None
    validate_at_start: bool = True


@dataclass(frozen=True)
class RetrievalConfig:
    """Stage-1 / MCIP settings (defaults: docs/method.md#stage-1, #mcip).

    ``mc_weight`` = 0 gives stage 1; MCIP uses 0.25 (ArcMargin then weighs ``1 - mc_weight``).
    ``max_negative``: form of the MC loss's extra term weighted by ``max_negative_weight``:
    ``authors`` (their code) or ``hardest`` (hardest-negative −log(1 − p); docs/method.md#mc-loss).
    ``freeze_norm`` keeps BatchNorm layers fixed (docs/method.md#frozen-norms).
    ``projector``: ``train`` keeps the projector in the joint space and trains it; ``reattach``
    trains the trunk on pre-projection features and keeps the original projector.
    ``patch_dropout``: share of ViT patch tokens dropped while training (authors: 0.33 for
    SigLIP, none otherwise; docs/method.md#patch-dropout); must be 0 for towers without patches.
    ``proxy_dtype``: ``fp32`` (default) or ``bf16`` cosine matmuls of the ArcMargin proxies (fp32 master
    weights, gradients, AdamW state, margin and softmax in both; docs/scaling.md). ``proxy_sharding``
    under ``torchrun``: ``replicated`` (default) proxies on every rank, or ``sharded`` by class across ranks
    (each keeps C/W rows and their AdamW state; checkpoints hold them whole). Sharding changes where the
    proxies live, not the result, so it is not part of the stage identity (:data:`NOT_IN_IDENTITY`).
    ``val_max_images``: validation during training scores I2I mAP on at most this many validation images --
    whole classes in an order seeded by ``train.seed``, the same images at every evaluation -- or on the
    whole validation split when it is smaller or this is ``None`` (docs/method.md#validation).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    proxy_lr_multiplier: float = 100.0
    arc_scale: float = 30.0
    arc_margin: float = 0.1
    mc_weight: float = 0.0
    max_negative_weight: float = 0.1
    freeze_norm: bool = True
    projector: Literal["train", "reattach"] = "train"
    num_workers: int = 0
    max_negative: Literal["authors", "hardest"] = "authors"
    patch_dropout: float = 0.0
    proxy_dtype: Literal["fp32", "bf16"] = "fp32"
    proxy_sharding: Literal["replicated", "sharded"] = "replicated"
    val_max_images: int | None = 2000


# stage settings that change how a run is executed, not the weights it trains (within float rounding):
# left out of the stage identity (clipopt_core.train.identity), so switching them reuses finished work
NOT_IN_IDENTITY = frozenset({"proxy_sharding"})


# realignment: the authors' open_clip run does not clip gradients (docs/method.md#realignment)
REALIGN_TRAIN_DEFAULTS = TrainConfig(lr=1e-5, lr_floor=0.0, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, epochs=10,
                                     batch_size=32768, eval_every_steps=100, grad_clip=None)


@dataclass(frozen=True)
class RealignConfig:
    """Stage-2 settings (docs/method.md#realignment: AdamW 0.9/0.98, eps 1e-6, LR 1e-5, wd 0.2 off
    norms/biases/scale, no gradient clipping). ``max_logit_scale``: the logit-scale parameter is
    clamped in place to ≤ ln(max_logit_scale) after each step. ``val_max_pairs``: the checkpoint is
    selected on at most this many validation pairs -- whole images (every caption of a kept image) in an
    order seeded by ``train.seed``, the same pairs at every evaluation -- or on all of them when there are
    fewer or this is ``None``. The default, 25,000, is the size of COCO's Karpathy test split (5,000
    images × 5 captions); 5% of a 10⁷-pair corpus would be 5·10⁵ queries at every evaluation."""

    train: TrainConfig = field(default_factory=lambda: REALIGN_TRAIN_DEFAULTS)
    last_blocks: int = 1
    max_logit_scale: float = 100.0
    val_max_pairs: int | None = 25_000


@dataclass(frozen=True)
class MiningConfig:
    """Pseudo-caption mining (docs/method.md#mining).

    ``threshold``: a cosine, or ``None`` to take the ``threshold_quantile`` of the top-1
    similarities (the right value depends on the mining model's similarity range: on the starter
    model 0.25 gave 13.6 captions/image and 0.35 gave 0.6). ``model_name``/``model_pretrained``:
    the mining model (an open_clip name and tag, see ``ModelSpec``); ``None`` mines with the base
    model. The authors mined once with OpenAI ViT-L/14 for every model they trained.
    """

    top_k: int = 20
    threshold: float | None = 0.27
    threshold_quantile: float = 0.5
    chunk_size: int = 65536
    model_name: str | None = None
    model_pretrained: str | None = None
