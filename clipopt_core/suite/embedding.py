"""Embed a benchmark's images and texts with one model, once: memoised per tower and content, optionally on disk.

Table 1 reuses embeddings across columns: ImageNet train is the kNN database of three columns, ImageNet
val feeds a kNN and a zero-shot column. :class:`SuiteEmbedder` keys every embedding by the fingerprint of
the tower that made it (:func:`clipopt_core.evaluate.protocol.tower_fingerprints`) and a hash of what was
embedded, so a second request is free, and variants sharing a tower (stage 1 and 2SFT share the image
tower) share the work. With ``cache_dir`` the embeddings also persist as ``.npy`` files (written to a temp
name, then renamed), so Dagster partitions evaluated in separate runs share them too.

Crops (``ImageSet.crops``) are applied to the decoded image *before* the eval transform
(docs/method.md#benchmark-suite): the cropped images are written losslessly (PNG, fast compression, one
thread per core) to a temporary folder, :data:`CROP_CHUNK` at a time, and embedded by
:func:`clipopt_core.models.encode.embed_images` like any other image.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clipopt_core.data.datasets import load_image
from clipopt_core.evaluate.protocol import tower_fingerprints
from clipopt_core.models.encode import Precision, embed_images, embed_texts, zero_shot_classifier
from clipopt_core.models.loading import ClipBundle

CROP_CHUNK = 2048  # cropped images written to disk at a time (bounds the temporary folder)


class SuiteEmbedder:
    """Embeddings of one model: ``[N, D]`` float32, rows L2-normalised, on CPU.

    ``cache_dir``: folder of persisted embeddings (``None``: memory only). Keys hold the tower
    fingerprint, so embeddings of other weights are never reused.
    """

    def __init__(self, bundle: ClipBundle, *, device: str | torch.device = "cpu", batch_size: int = 64,
                 precision: Precision = "auto", cache_dir: Path | None = None) -> None:
        self.bundle = bundle
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.cache_dir = cache_dir
        self.image_tower, self.text_tower = tower_fingerprints(bundle)
        self._memory: dict[str, torch.Tensor] = {}

    def images(self, uris: Sequence[str], crops: np.ndarray | None = None) -> torch.Tensor:
        """``[N, D]`` embeddings of ``uris``; ``crops`` ``[N, 4]`` pixel boxes ``(x0, y0, x1, y1)`` or ``None``."""
        parts = [self.image_tower, "images", *uris]
        if crops is not None:
            parts.append(np.ascontiguousarray(crops, dtype=np.float64).tobytes().hex())
        return self._cached(parts, lambda: self._embed_images(list(uris), crops))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[T, D]`` embeddings of ``texts``."""
        return self._cached([self.text_tower, "texts", *texts],
                            lambda: embed_texts(self.bundle, list(texts), device=self.device, precision=self.precision))

    def classifier(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """``[C, D]`` zero-shot class embeddings: mean of the normalised prompt embeddings, renormalised."""
        return self._cached([self.text_tower, "classifier", *class_names, "\x01", *templates],
                            lambda: zero_shot_classifier(self.bundle, list(class_names), list(templates),
                                                         device=self.device))

    def _embed_images(self, uris: list[str], crops: np.ndarray | None) -> torch.Tensor:
        def embed(paths: list[str]) -> torch.Tensor:
            return embed_images(self.bundle, paths, batch_size=self.batch_size, device=self.device,
                                precision=self.precision)

        if crops is None:
            return embed(uris)
        if crops.shape != (len(uris), 4):
            raise ValueError(f"crops must be [{len(uris)}, 4] boxes (x0, y0, x1, y1), got {crops.shape}")
        chunks = []
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decode and PNG encode release the GIL
            for start in range(0, len(uris), CROP_CHUNK):
                with tempfile.TemporaryDirectory(prefix="clipopt-crops-") as folder:
                    targets = [Path(folder) / f"{start + i}.png" for i in range(len(uris[start:start + CROP_CHUNK]))]
                    paths = list(pool.map(write_crop, uris[start:start + CROP_CHUNK], crops[start:start + CROP_CHUNK],
                                          targets))
                    chunks.append(embed(paths))
        return torch.cat(chunks) if chunks else torch.empty(0, self.bundle.embed_dim)

    def _cached(self, parts: list[str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"{key}.npy" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = compute()
            if path is not None:
                save_array(path, value.numpy())
        self._memory[key] = value
        return value


def write_crop(uri: str, box: np.ndarray, target: Path) -> str:
    """Decode ``uri``, crop ``box`` ``(x0, y0, x1, y1)`` (pixels, clipped to the image), save as PNG; the path."""
    image = load_image(uri)
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = max(0, int(round(x0))), max(0, int(round(y0)))
    right, bottom = min(image.width, int(round(x1))), min(image.height, int(round(y1)))
    if right <= left or bottom <= top:
        raise ValueError(f"{uri}: crop box {tuple(box.tolist())} is empty inside the {image.width}x{image.height} image")
    image.crop((left, top, right, bottom)).save(target, format="PNG", compress_level=1)  # lossless, fast
    return str(target)


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` to a temp name beside ``path``, then rename (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.tmp-{uuid.uuid4().hex}.npy")
    np.save(staging, array, allow_pickle=False)
    os.replace(staging, path)
