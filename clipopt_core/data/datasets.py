"""Transforms, datasets and a deterministic, resumable batch order.

Augmentation randomness is seeded per *sample* from ``(seed, epoch, index)``, so a run
resumed mid-epoch draws exactly the crops and flips the uninterrupted run would have,
whatever the number of loader workers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from clipopt_core.data.images import decode_image, read_uri_bytes

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
    """Read and decode one image (local path, fsspec URL or tar member, :func:`read_uri_bytes`) to RGB on white."""
    return decode_image(read_uri_bytes(uri), name=uri)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The seeded generator of one epoch's batch order (its own: drawing from it never touches the global RNG)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of batch layout and workers."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little") >> 1


DEFAULT_DECODE_CACHE_BYTES = 1 << 30  # 1 GiB of decoded pixels per process (each loader worker has its own)


def decoded_bytes(image: Image.Image) -> int:
    """Bytes of a decoded image's pixels: width × height × bands (3 for RGB)."""
    return image.width * image.height * len(image.getbands())


class ImageDataset(Dataset):
    """Images by URI with integer labels; items are ``(transform(image) [3,S,S], label, index)``.

    An index is either ``int`` (no augmentation seed: used for evaluation) or
    ``(int, seed)`` from :class:`EpochBatches` (seeded augmentation for training).

    Decoded images are kept in memory after first use when ``cache_decoded``, up to ``cache_bytes``
    of pixels (:func:`decoded_bytes`; default :data:`DEFAULT_DECODE_CACHE_BYTES`): images are kept in the
    order they are first read until the next one would pass the budget, and the rest are decoded on
    every read. A set that fits is thus decoded once; a larger one keeps a fixed part (no eviction churn
    under the random batch order) and memory stays bounded whatever the set's size.
    """

    def __init__(self, uris: Sequence[str], labels: Sequence[int], transform: Callable, cache_decoded: bool = True,
                 cache_bytes: int = DEFAULT_DECODE_CACHE_BYTES) -> None:
        if len(uris) != len(labels):
            raise ValueError(f"{len(uris)} uris but {len(labels)} labels")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.uris = list(uris)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform = transform
        self.cache_bytes = cache_bytes if cache_decoded else 0
        self._cache: dict[int, Image.Image] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def cached_items(self) -> int:
        """How many decoded images the cache holds now."""
        return len(self._cache)

    def image(self, index: int) -> Image.Image:
        if index in self._cache:
            return self._cache[index]
        image = load_image(self.uris[index])
        size = decoded_bytes(image)
        if self.cached_bytes + size <= self.cache_bytes:
            self._cache[index] = image
            self.cached_bytes += size
        return image

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


class SourceWeightedBatches:
    """Batch sampler over several sources, each drawn with its weight's share (docs/method.md#multi-source).

    ``sources[i]`` is the source number of item ``i``; source ``s`` gets the share ``weights[s] / sum(weights)``
    of every epoch's ``⌊N / batch_size⌋ · batch_size`` draws (N = number of items, the same epoch length
    as :class:`EpochBatches`). Draws interleave smoothly: the k-th draw of source s sits at time
    ``(k + ½) / share_s``, so every prefix of the epoch, and every batch, holds each source's share to
    within one draw. Within a source, items come from seeded permutations, one per pass over it: a
    small source with a large weight is cycled (a new permutation per pass), a large one with a small
    weight is sub-sampled. Yields lists of ``(index, augmentation_seed)``; the seed is
    ``sample_seed(seed, epoch, index + pass·N)``, so an item drawn twice in an epoch is augmented twice
    differently. With one source it yields exactly the batches of :class:`EpochBatches`.
    Like :class:`EpochBatches`: seeded by ``(seed, epoch)``, ``start_step`` resumes
    mid-epoch with the same batches, and ``batch_size`` is the global batch that
    :func:`clipopt_core.runtime.distributed.shard_batches` slices per rank.
    """

    def __init__(self, sources: Sequence[int], weights: Sequence[float], batch_size: int, seed: int,
                 epoch: int = 0, start_step: int = 0) -> None:
        self.sources = torch.as_tensor(list(sources), dtype=torch.long)
        self.weights = torch.as_tensor(list(weights), dtype=torch.float64)
        self.batch_size, self.seed, self.epoch, self.start_step = batch_size, seed, epoch, start_step
        if len(self.sources) < batch_size:
            raise ValueError(f"{len(self.sources)} training items is fewer than one batch of {batch_size}; lower batch_size")
        counts = torch.bincount(self.sources, minlength=len(self.weights))
        if len(counts) != len(self.weights) or bool((counts == 0).any()) or bool((self.weights <= 0).any()):
            raise ValueError(f"every source needs items and a positive weight: items per source {counts.tolist()}, "
                             f"weights {self.weights.tolist()}")

    def __len__(self) -> int:
        return len(self.sources) // self.batch_size - self.start_step

    def draws_per_source(self) -> list[int]:
        """How many of one epoch's draws each source gets."""
        return torch.bincount(self._slot_sources(), minlength=len(self.weights)).tolist()

    def _slot_sources(self) -> torch.Tensor:
        """The source of each draw of the epoch [steps·batch_size], smoothly interleaved by share."""
        total = (len(self.sources) // self.batch_size) * self.batch_size
        share = self.weights / self.weights.sum()
        times, owners = [], []
        for source, fraction in enumerate(share.tolist()):
            draws = int(total * fraction) + 2
            times.append((torch.arange(draws, dtype=torch.float64) + 0.5) / fraction)
            owners.append(torch.full((draws,), source, dtype=torch.long))
        order = torch.argsort(torch.cat(times), stable=True)[:total]
        return torch.cat(owners)[order]

    def _source_items(self, source: int, draws: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(item indices [draws], pass number of each) of ``source``: seeded permutations, one per pass."""
        members = torch.nonzero(self.sources == source).flatten()
        passes = -(-draws // len(members))
        items = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(passes)])[:draws]
        return items, torch.arange(draws) // len(members)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        slots = self._slot_sources()
        items = torch.empty_like(slots)
        passes = torch.empty_like(slots)
        generator = epoch_generator(self.seed, self.epoch)  # drawn source after source: one source = EpochBatches
        for source in range(len(self.weights)):
            where = torch.nonzero(slots == source).flatten()
            items[where], passes[where] = self._source_items(source, len(where), generator)
        keys = (items + passes * len(self.sources)).tolist()
        items_list = items.tolist()
        for step in range(self.start_step, len(slots) // self.batch_size):
            chunk = range(step * self.batch_size, (step + 1) * self.batch_size)
            yield [(items_list[i], sample_seed(self.seed, self.epoch, keys[i])) for i in chunk]


def encode_labels(labels: Sequence[str]) -> tuple[list[int], list[str]]:
    """Map string labels to contiguous ids (sorted class names) → (ids, class_names)."""
    names = sorted(set(labels))
    lookup = {name: number for number, name in enumerate(names)}
    return [lookup[label] for label in labels], names
