"""Batched image and text embedding (eval transform, L2-normalised float32 outputs).

Speed knobs, all defaulting to what helps on the device:

- ``precision``: ``auto`` is bf16 autocast on CUDA and fp32 on CPU; ``fp32``, ``bf16``, ``fp16`` force one.
- ``channels_last``: ``None`` (auto) uses the channels-last memory format on CUDA, where convolutions
  (a ConvNeXt/ResNet tower, a ViT's patch stem) run faster in it; the model's 4-D weights are converted
  in place, which changes no values.
- ``num_workers=None``: 0 on CPU (decoding workers would compete with the model for the same cores)
  and up to 8 on CUDA, where workers decode the next batches while the GPU computes.
- ``batch_size="auto"``: start from :data:`AUTO_BATCH` of the device and fit memory by backing off:
  a batch that raises ``torch.OutOfMemoryError`` is redone in halves, and the size that fits is kept
  for the rest of the call (:class:`MicroBatcher`).
"""
from __future__ import annotations

import os
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipopt_core.data.datasets import ImageDataset, eval_geometry, normalize_batch
from clipopt_core.models.loading import ClipBundle

Progress = Callable[[int, int], None]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTO_BATCH = {"cuda": 1024, "cpu": 64}  # first try of batch_size="auto"; OOM halves it
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: Precision = "auto") -> torch.autocast:
    """Autocast context for ``precision`` on ``device`` (``auto``: bf16 on CUDA, off on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(_AUTOCAST_DTYPES)}; got {precision!r}")
    dtype = _AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class MicroBatcher:
    """Apply ``fn`` to a batch in micro-batches of ``size`` rows, halving ``size`` on out-of-memory.

    The size that fitted is kept for later batches (a call never grows it again); an OOM at size 1
    is re-raised. Outputs are concatenated in order, so the result equals ``fn(batch)``.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size = size

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        outputs, start = [], 0
        while start < len(batch):
            out_of_memory = False
            try:
                outputs.append(fn(batch[start:start + self.size]))
            except torch.OutOfMemoryError:
                if self.size == 1:
                    raise
                out_of_memory = True  # handled outside the except block, so its frames free the tensors
            if out_of_memory:
                self.size = max(1, self.size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += len(outputs[-1])
        return torch.cat(outputs)


def default_workers(device: torch.device, cpus: int | None = None) -> int:
    """DataLoader workers for ``num_workers=None``: 0 on CPU, ``min(8, cpus - 1)`` on CUDA."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return min(8, max(cpus - 1, 0)) if device.type == "cuda" else 0


def _batch_size(batch_size: int | Literal["auto"], device: torch.device) -> int:
    if batch_size == "auto":
        return AUTO_BATCH.get(device.type, AUTO_BATCH["cpu"])
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


@torch.inference_mode()
def embed_images(bundle: ClipBundle, uris: Sequence[str], *, batch_size: int | Literal["auto"] = 64,
                 num_workers: int | None = None, device: str | torch.device = "cpu", progress: Progress | None = None,
                 precision: Precision = "auto", channels_last: bool | None = None) -> torch.Tensor:
    """Embed images (eval transform) → float32 [N, D], rows L2-normalised, on CPU.

    Workers decode, resize and crop to uint8; scaling and normalisation run per batch on ``device``.
    """
    device = torch.device(device)
    dataset = ImageDataset(uris, [0] * len(uris), eval_geometry(bundle.image_size, bundle.interpolation),
                           cache_decoded=False)  # uint8 items; normalised per batch on the device
    workers = default_workers(device) if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=_batch_size(batch_size, device), num_workers=workers,
                        pin_memory=device.type == "cuda")
    model = bundle.model.eval()
    memory_format = torch.channels_last if (device.type == "cuda" if channels_last is None else channels_last) \
        else torch.contiguous_format
    model.to(memory_format=memory_format)
    batcher = MicroBatcher(loader.batch_size)

    def encode(images: torch.Tensor) -> torch.Tensor:
        pixels = normalize_batch(images.to(device, non_blocking=True), bundle.mean, bundle.std)
        with autocast(device, precision):
            features = model.encode_image(pixels.contiguous(memory_format=memory_format))
        return F.normalize(features.float(), dim=-1).cpu()

    chunks: list[torch.Tensor] = []
    for images, *_ in loader:
        chunks.append(batcher(encode, images))
        if progress:
            progress(sum(len(c) for c in chunks), len(uris))
    return torch.cat(chunks) if chunks else torch.empty(0, bundle.embed_dim)


@torch.inference_mode()
def embed_texts(bundle: ClipBundle, texts: Sequence[str], *, batch_size: int | Literal["auto"] = 256,
                device: str | torch.device = "cpu", progress: Progress | None = None,
                precision: Precision = "auto") -> torch.Tensor:
    """Embed texts → float32 [T, D], rows L2-normalised, on CPU."""
    device = torch.device(device)
    model = bundle.model.eval()
    step = _batch_size(batch_size, device)
    batcher = MicroBatcher(step)

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            features = model.encode_text(tokens.to(device))
        return F.normalize(features.float(), dim=-1).cpu()

    chunks: list[torch.Tensor] = []
    for start in range(0, len(texts), step):
        chunks.append(batcher(encode, bundle.tokenize(list(texts[start:start + step]))))
        if progress:
            progress(min(start + step, len(texts)), len(texts))
    return torch.cat(chunks) if chunks else torch.empty(0, bundle.embed_dim)


def zero_shot_classifier(bundle: ClipBundle, class_names: Sequence[str], templates: Sequence[str], *,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """Class embeddings [C, D]: mean of the normalised prompt embeddings over ``templates``, renormalised.

    Each template holds ``{}`` where the class name goes (``"a photo of a {}."``).
    """
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = embed_texts(bundle, prompts, device=device).view(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)
