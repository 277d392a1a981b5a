"""What a benchmark loader returns: image sets with labels, revisited-retrieval ground truth, caption sets.

Loaders (``clipopt_core.suite.datasets``) read a benchmark's *official* on-disk layout and return these;
protocols (``clipopt_core.suite.protocols``) embed the images and compute the paper's metric. URIs are
strings that :func:`clipopt_core.data.datasets.load_image` opens (local paths or ``s3://`` URLs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class BenchmarkLayoutError(ValueError):
    """A benchmark root is missing, or does not hold the official layout: the message names the file and the fix."""


@dataclass(frozen=True)
class ImageSet:
    """Labelled images of one split.

    ``uris``: N image URIs. ``labels``: [N] int64 class ids, each an index into ``class_names``.
    ``class_names``: the classes in id order (prompt-ready names for zero-shot, e.g. "tench").
    ``crops``: optional [N, 4] float boxes ``(x0, y0, x1, y1)`` in pixels to crop before embedding
    (``None``: whole images).
    """

    name: str
    uris: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    crops: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.uris),):
            raise ValueError(f"{self.name}: {len(self.uris)} images but labels of shape {self.labels.shape}")
        if len(self.uris) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"{self.name}: labels must index class_names (0..{len(self.class_names) - 1})")


@dataclass(frozen=True)
class RevisitedSet:
    """Revisited Oxford/Paris (Radenović et al. 2018): a database and queries with easy/hard/junk ground truth.

    ``database``: N image URIs. ``queries``: Q query image URIs (the paper uses them *uncropped*).
    ``query_boxes``: [Q, 4] float ``(x0, y0, x1, y1)`` pixel boxes from the ground truth (kept for the
    cropped protocol, not used by default). ``easy``, ``hard``, ``junk``: per query, int64 arrays of
    database indices. Protocols: easy = positives easy, junk hard+junk; medium = easy+hard, junk junk;
    hard = positives hard, junk easy+junk.
    """

    name: str
    database: tuple[str, ...]
    queries: tuple[str, ...]
    query_boxes: np.ndarray
    easy: tuple[np.ndarray, ...]
    hard: tuple[np.ndarray, ...]
    junk: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        q = len(self.queries)
        if not (len(self.easy) == len(self.hard) == len(self.junk) == q and self.query_boxes.shape == (q, 4)):
            raise ValueError(f"{self.name}: {q} queries but ground truth for "
                             f"{len(self.easy)}/{len(self.hard)}/{len(self.junk)} and boxes {self.query_boxes.shape}")


@dataclass(frozen=True)
class CaptionSet:
    """Image–caption retrieval test split (Karpathy): images, and captions each pointing at its image.

    ``images``: M image URIs. ``captions``: T texts. ``caption_image``: [T] int64 index into ``images``
    (5 per image for Flickr30k/COCO).
    """

    name: str
    images: tuple[str, ...]
    captions: tuple[str, ...]
    caption_image: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.caption_image.shape != (len(self.captions),):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but caption_image {self.caption_image.shape}")
