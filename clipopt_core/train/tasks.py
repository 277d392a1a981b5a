"""The training stages of docs/method.md as :class:`~clipopt_core.train.loop.TrainTask` s.

* :class:`RetrievalTask` — stage 1 (ArcMargin on the image tower) and, with caption
  embeddings, MCIP (0.75·ArcMargin + 0.25·MCArcMargin against the frozen text tower).
* :class:`RealignTask` — stage 2: image tower frozen, InfoNCE between *precomputed* image
  embeddings and the text tower's last blocks.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from clipopt_core.runtime import distributed

from clipopt_core.models import towers
from clipopt_core.data.datasets import EpochBatches, ImageDataset, SourceWeightedBatches, epoch_generator
from clipopt_core.train.losses import ArcMarginLoss, MultiCaptionArcMarginLoss, SymmetricInfoNCE
from clipopt_core.models.loading import ClipBundle
from clipopt_core.train.config import RealignConfig, RetrievalConfig, TrainConfig



class RetrievalTask:
    """Stage 1 / MCIP over a labelled training set.

    Args:
        bundle: the model (its text tower is frozen here).
        dataset: training images; items ``(image [3,S,S], label)`` with seeded augmentation.
        num_classes: number of distinct labels (ArcMargin proxies).
        validate_fn: returns validation mAP of the current model (higher is better); the runner scores a
            bounded, fixed subset of the validation split (``val_max_images``; docs/method.md#validation).
        caption_embeddings: MCIP only, frozen text embeddings [P, D] of all pseudo-captions.
        captions_of: MCIP only, for each training item the caption rows it owns (0–top_k).
        source_weights: several weighted sources only, (source number of each item, weight of each
            source): batches from :class:`SourceWeightedBatches` instead of :class:`EpochBatches`.
    """

    def __init__(self, bundle: ClipBundle, dataset: ImageDataset, num_classes: int, config: RetrievalConfig,
                 validate_fn: Any, caption_embeddings: torch.Tensor | None = None,
                 captions_of: Sequence[Sequence[int]] | None = None,
                 source_weights: tuple[Sequence[int], Sequence[float]] | None = None) -> None:
        if config.mc_weight and (caption_embeddings is None or captions_of is None):
            raise ValueError("mc_weight > 0 (MCIP) needs caption_embeddings and captions_of")
        self.bundle, self.dataset, self.config, self._validate_fn = bundle, dataset, config, validate_fn
        model = bundle.model
        towers.freeze(model)
        towers.set_patch_dropout(model.visual, config.patch_dropout)  # acts in train mode only
        self._reattach = config.projector == "reattach"
        self._trainable = self._visual_trainable(model)
        for parameter in self._trainable:
            parameter.requires_grad_(True)
        with torch.no_grad():
            feature_dim = self._features(torch.zeros(1, 3, bundle.image_size, bundle.image_size)).shape[-1]
        self.arc = ArcMarginLoss(feature_dim, num_classes, config.arc_scale, config.arc_margin,
                                 proxy_dtype=config.proxy_dtype, sharding=config.proxy_sharding)
        self.multi_caption = MultiCaptionArcMarginLoss(config.arc_scale, config.arc_margin, config.max_negative_weight,
                                                       config.max_negative)
        self.modules = nn.ModuleDict({"model": model, "arc": self.arc})
        self._captions = caption_embeddings
        self._captions_of = [torch.as_tensor(list(rows), dtype=torch.long) for rows in captions_of] if captions_of else None
        self._source_weights = source_weights

    def _visual_trainable(self, model: nn.Module) -> list[nn.Parameter]:
        params = towers.visual_parameters(model, freeze_norm=self.config.freeze_norm)
        if not self._reattach:
            return params
        head = towers.visual_projection(model)
        excluded = {id(p) for p in ([head] if isinstance(head, nn.Parameter) else head.parameters())}
        return [p for p in params if id(p) not in excluded]

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] → [B,D'] joint-space embeddings, or trunk features when re-attaching the projector."""
        visual = self.bundle.model.visual
        if not self._reattach:
            return self.bundle.model.encode_image(images)
        if hasattr(visual, "trunk"):
            return visual.trunk(images)
        projection, visual.proj = visual.proj, None
        try:
            return visual(images)
        finally:
            visual.proj = projection

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return [
            {"params": self._trainable, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": list(self.arc.parameters()), "lr": config.lr * self.config.proxy_lr_multiplier,
             "weight_decay": config.weight_decay},
        ]

    def steps_per_epoch(self, config: TrainConfig) -> int:
        return len(self.dataset) // config.batch_size

    def batches(self, config: TrainConfig, epoch: int, start_step: int) -> Iterable[Any]:
        if self._source_weights is None:
            sampler = EpochBatches(len(self.dataset), config.batch_size, config.seed, epoch, start_step)
        else:
            sampler = SourceWeightedBatches(*self._source_weights, config.batch_size, config.seed, epoch, start_step)
        sampler = distributed.shard_batches(sampler)  # under torchrun: this rank's slice of each global batch
        # own generator: creating the loader must not draw from the global RNG (resumed runs would diverge)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.config.num_workers, collate_fn=_collate,
                            generator=epoch_generator(config.seed, epoch))
        return loader

    def train_mode(self) -> None:
        self.bundle.model.eval()
        towers.train_mode(self.bundle.model.visual, freeze_norm=self.config.freeze_norm)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels, indices = batch
        device = next(self.bundle.model.parameters()).device
        features = self._features(images.to(device))
        arc = self.arc(features, labels.to(device))
        if not self.config.mc_weight:
            return arc, {"arc": float(arc.detach())}
        owned = [self._captions_of[i] for i in indices.tolist()]
        owner = torch.repeat_interleave(torch.arange(len(owned)), torch.tensor([len(r) for r in owned], dtype=torch.long))
        rows = torch.cat(owned)
        multi = self.multi_caption(*distributed.gather_captioned(features, self._captions[rows].to(device), owner.to(device)))
        total = (1 - self.config.mc_weight) * arc + self.config.mc_weight * multi
        return total, {"arc": float(arc.detach()), "mc": float(multi.detach()), "captioned": float(rows.numel() > 0)}

    def validate(self) -> float:
        self.bundle.model.eval()
        return float(self._validate_fn(self.bundle))


class PairRows(Protocol):
    """Realignment pairs read by row: :class:`InMemoryPairs`, or the disk cache
    :class:`clipopt_core.train.embedding_cache.CachedPairs`."""

    def __len__(self) -> int: ...
    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[str]]: ...


class InMemoryPairs:
    """Pairs held in memory: image embeddings [P, D] and P captions, pair i ↔ row i."""

    def __init__(self, image_embeddings: torch.Tensor, captions: Sequence[str]) -> None:
        if len(captions) != len(image_embeddings):
            raise ValueError(f"{len(captions)} captions but {len(image_embeddings)} image embeddings")
        self.image_embeddings, self.captions = image_embeddings.float(), list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Rows ``indices`` [b] → (embeddings [b, D], b captions)."""
        return self.image_embeddings[indices], [self.captions[i] for i in indices.tolist()]


class RealignTask:
    """Stage 2 over (cached image embedding, caption) pairs.

    Args:
        image_embeddings: [P, D] L2-normalised embeddings of the pair images (frozen tower, eval
            transform), or a :class:`PairRows` holding embeddings and captions (the disk cache,
            read batch by batch) with ``captions=None``.
        captions: P caption strings, pair i ↔ ``image_embeddings[i]``.
        validate_fn: returns a text→image score of the current model (higher is better).
    """

    def __init__(self, bundle: ClipBundle, image_embeddings: torch.Tensor | PairRows, captions: Sequence[str] | None,
                 config: RealignConfig, validate_fn: Any) -> None:
        if isinstance(image_embeddings, torch.Tensor):
            self.pairs: PairRows = InMemoryPairs(image_embeddings, captions if captions is not None else [])
        elif captions is not None:
            raise ValueError("captions come with the PairRows: pass captions=None")
        else:
            self.pairs = image_embeddings
        self.bundle, self.config, self._validate_fn = bundle, config, validate_fn
        model = bundle.model
        towers.freeze(model)
        self._tail = towers.text_tail_parameters(model, config.last_blocks)
        for parameter in self._tail:
            parameter.requires_grad_(True)
        self.infonce = SymmetricInfoNCE(float(model.logit_scale.detach().float().mean()), config.max_logit_scale)
        self.modules = nn.ModuleDict({"model": model, "infonce": self.infonce})

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        """Decay / no-decay groups; one clip group for both (open_clip clips all parameters together)."""
        names = {id(p): n for n, p in self.bundle.model.named_parameters()}
        decay = [p for p in self._tail if not towers.no_weight_decay(names[id(p)], p)]
        no_decay = [p for p in self._tail if towers.no_weight_decay(names[id(p)], p)]
        return [
            {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay, "clip_group": "text"},
            {"params": no_decay + [self.infonce.logit_scale], "lr": config.lr, "weight_decay": 0.0, "clip_group": "text"},
        ]

    def steps_per_epoch(self, config: TrainConfig) -> int:
        return math.ceil(len(self.pairs) / self._batch(config)) if len(self.pairs) >= 2 else 0

    def _batch(self, config: TrainConfig) -> int:
        return max(2, min(config.batch_size, len(self.pairs)))

    def batches(self, config: TrainConfig, epoch: int, start_step: int) -> Iterable[tuple[torch.Tensor, list[str]]]:
        generator = epoch_generator(config.seed, epoch)
        order = torch.randperm(len(self.pairs), generator=generator)
        size = self._batch(config)
        for step in range(start_step, self.steps_per_epoch(config)):
            chunk = order[step * size:(step + 1) * size]
            if len(chunk) < 2:  # a 1-pair batch has no negatives: borrow from the start
                chunk = torch.cat([chunk, order[:1]])
            chunk = distributed.local_rows(chunk)  # under torchrun: this rank's part of the global batch
            yield self.pairs.take(chunk)

    def train_mode(self) -> None:
        self.bundle.model.eval()  # dropout off: the paper fine-tunes the tail deterministically
        for parameter in self._tail:
            parameter.requires_grad_(True)

    def loss(self, batch: tuple[torch.Tensor, list[str]]) -> tuple[torch.Tensor, dict[str, float]]:
        image_embeddings, captions = batch
        device = next(self.bundle.model.parameters()).device
        text = self.bundle.model.encode_text(self.bundle.tokenize(captions).to(device))
        loss = self.infonce(*distributed.gather_pairs(image_embeddings.to(device), text))  # global batch under torchrun
        return loss, {"logit_scale": float(self.infonce.effective_scale().detach())}

    def after_step(self) -> None:
        """Clamp the logit-scale parameter in place after each optimizer step (as open_clip does)."""
        self.infonce.clamp_logit_scale_()

    def validate(self) -> float:
        self.bundle.model.eval()
        return float(self._validate_fn(self.bundle))

    def finish(self) -> None:
        """Copy the learned (clamped) logit scale back into the model before export."""
        with torch.no_grad():
            self.bundle.model.logit_scale.fill_(float(self.infonce.logit_scale))


def _collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, indices = zip(*items)
    return torch.stack(images), torch.stack(labels), torch.tensor(indices, dtype=torch.long)
