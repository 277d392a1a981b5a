"""Batched image and text embedding (eval transform, L2-normalised float32 outputs)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipopt_core.data import ImageDataset, eval_transform
from clipopt_core.models import ClipBundle

Progress = Callable[[int, int], None]


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def embed_images(bundle: ClipBundle, uris: Sequence[str], *, batch_size: int = 64, num_workers: int = 0,
                 device: str | torch.device = "cpu", progress: Progress | None = None) -> torch.Tensor:
    """Embed images (eval transform) → float32 [N, D], rows L2-normalised, on CPU."""
    device = torch.device(device)
    dataset = ImageDataset(uris, [0] * len(uris), eval_transform(bundle.image_size, bundle.mean, bundle.std, bundle.interpolation),
                           cache_decoded=False)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    model = bundle.model.eval()
    chunks: list[torch.Tensor] = []
    for images, *_ in loader:
        with _autocast(device):
            features = model.encode_image(images.to(device, non_blocking=True))
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
        if progress:
            progress(sum(len(c) for c in chunks), len(uris))
    return torch.cat(chunks) if chunks else torch.empty(0, bundle.embed_dim)


@torch.inference_mode()
def embed_texts(bundle: ClipBundle, texts: Sequence[str], *, batch_size: int = 256,
                device: str | torch.device = "cpu", progress: Progress | None = None) -> torch.Tensor:
    """Embed texts → float32 [T, D], rows L2-normalised, on CPU."""
    device = torch.device(device)
    model = bundle.model.eval()
    chunks: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenize(list(texts[start:start + batch_size])).to(device)
        with _autocast(device):
            features = model.encode_text(tokens)
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
        if progress:
            progress(min(start + batch_size, len(texts)), len(texts))
    return torch.cat(chunks) if chunks else torch.empty(0, bundle.embed_dim)


def zero_shot_classifier(bundle: ClipBundle, class_names: Sequence[str], templates: Sequence[str], *,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """Class embeddings [C, D]: mean of the normalised prompt embeddings over ``templates``, renormalised.

    Each template holds ``{}`` where the class name goes (``"a photo of a {}."``).
    """
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = embed_texts(bundle, prompts, device=device).view(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)
