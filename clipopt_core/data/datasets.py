"""Transforms, datasets and a deterministic, resumable batch order.

Augmentation randomness is seeded per *sample* from ``(seed, epoch, index)``, so a run
resumed mid-epoch draws exactly the crops and flips the uninterrupted run would have,
whatever the number of loader workers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import fsspec
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from clipopt_core.data.images import decode_image
from clipopt_core.data.tar_shards import is_member_uri, read_member

RESIZE_RATIO = 1.125  # docs/method.md#transforms: square resize to 1.125·S, then crop S


def _resized_side(size: int) -> int:
    """The square side images are resized to before cropping ``size``: ⌊1.125·size⌋ as in the authors' code."""
    return int(size * RESIZE_RATIO)


def _interpolation(name: str) -> v2.InterpolationMode:
    return {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}.get(
        name, v2.InterpolationMode.BICUBIC
    )


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic") -> v2.Compose:
    """PIL RGB → float [3, size, size]: square resize to 1.125·S, random crop S, flip, colour jitter 0.4, normalise."""
    resized = _resized_side(size)
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize((resized, resized), interpolation=_interpolation(interpolation), antialias=True),
        v2.RandomCrop(size),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.4, 0.4, 0.4),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_geometry(size: int, interpolation: str = "bicubic") -> v2.Compose:
    """PIL RGB → uint8 [3, size, size]: *square* resize to 1.125·S (aspect ratio not kept), centre
    crop S (not normalised) — the authors' eval transform (docs/method.md#transforms)."""
    resized = _resized_side(size)
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize((resized, resized), interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(size),
    ])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic") -> v2.Compose:
    """PIL RGB → float [3, size, size]: :func:`eval_geometry`, then scaled to [0, 1] and normalised."""
    return v2.Compose([eval_geometry(size, interpolation), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, S, S] → float32 [B, 3, S, S] as :func:`eval_transform` scales and normalises one image,
    in one pass per batch on the tensor's device (cheaper than per image, and a GPU gets uint8: 4× fewer bytes)."""
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


def load_image(uri: str) -> Image.Image:
    """Read and decode one image (local path, fsspec URL or tar member URI) to RGB on white."""
    if is_member_uri(uri):
        return decode_image(read_member(uri), name=uri)
    with fsspec.open(uri, "rb") as handle:
        return decode_image(handle.read(), name=uri)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The seeded generator of one epoch's batch order (its own: drawing from it never touches the global RNG)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of batch layout and workers."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little") >> 1


class ImageDataset(Dataset):
    """Images by URI with integer labels; items are ``(transform(image) [3,S,S], label, index)``.

    An index is either ``int`` (no augmentation seed: used for evaluation) or
    ``(int, seed)`` from :class:`EpochBatches` (seeded augmentation for training).
    Decoded images are kept in memory after first use when ``cache_decoded``.
    """

    def __init__(self, uris: Sequence[str], labels: Sequence[int], transform: Callable, cache_decoded: bool = True) -> None:
        if len(uris) != len(labels):
            raise ValueError(f"{len(uris)} uris but {len(labels)} labels")
        self.uris = list(uris)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform = transform
        self._cache: dict[int, Image.Image] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.uris)

    def image(self, index: int) -> Image.Image:
        if self._cache is None:
            return load_image(self.uris[index])
        if index not in self._cache:
            self._cache[index] = load_image(self.uris[index])
        return self._cache[index]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.image(index)
        if seed is None:
            return self.transform(image), self.labels[index], index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), self.labels[index], index


@dataclass
class EpochBatches:
    """Batch sampler: a seeded permutation per epoch, resumable at any step.

    Yields lists of ``(index, augmentation_seed)``. ``start_step`` skips the first batches
    of ``epoch`` (used when resuming); incomplete last batches are dropped.
    """

    num_items: int
    batch_size: int
    seed: int
    epoch: int = 0
    start_step: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.batch_size:
            raise ValueError(f"{self.num_items} training items is fewer than one batch of {self.batch_size}; lower batch_size")

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        steps = self.num_items // self.batch_size
        for step in range(self.start_step, steps):
            chunk = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in chunk]


def encode_labels(labels: Sequence[str]) -> tuple[list[int], list[str]]:
    """Map string labels to contiguous ids (sorted class names) → (ids, class_names)."""
    names = sorted(set(labels))
    lookup = {name: number for number, name in enumerate(names)}
    return [lookup[label] for label in labels], names
