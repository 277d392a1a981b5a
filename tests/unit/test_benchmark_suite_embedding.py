"""SuiteEmbedder: crops applied before the eval transform, embeddings shared in memory and on disk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipopt_core.models.encode import embed_images
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.suite import embedding
from clipopt_core.suite.embedding import SuiteEmbedder
from tests.conftest import COLOURS, draw_shape


@pytest.fixture
def bundle(tmp_path):
    return load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path / "models")


def test_crops_equal_embedding_the_cropped_image(bundle, tmp_path):
    """A box crops the decoded image before resizing: same embedding as the cropped file on its own."""
    canvas = Image.new("RGB", (80, 60), (255, 255, 255))
    canvas.paste(draw_shape("circle", COLOURS["red"], 1).convert("RGB"), (0, 0))
    canvas.paste(draw_shape("square", COLOURS["blue"], 2).convert("RGB"), (40, 20))
    canvas.save(tmp_path / "scene.png")
    canvas.crop((40, 20, 80, 60)).save(tmp_path / "square.png")
    embedder = SuiteEmbedder(bundle)
    cropped = embedder.images([str(tmp_path / "scene.png")], np.array([[40.0, 20.0, 80.0, 60.0]]))
    reference = embed_images(bundle, [str(tmp_path / "square.png")])
    whole = embedder.images([str(tmp_path / "scene.png")])
    assert torch.allclose(cropped, reference, atol=1e-5)
    assert not torch.allclose(cropped, whole, atol=1e-3)
    with pytest.raises(ValueError, match="is empty inside the 80x60 image"):
        embedder.images([str(tmp_path / "scene.png")], np.array([[90.0, 0.0, 100.0, 10.0]]))


def test_embeddings_are_reused_in_memory_and_from_the_cache_folder(bundle, tmp_path, monkeypatch):
    draw_shape("cross", COLOURS["green"], 3).save(tmp_path / "a.png")
    uris = [str(tmp_path / "a.png")]
    first = SuiteEmbedder(bundle, cache_dir=tmp_path / "cache")
    embedded = first.images(uris)
    texts = first.texts(["a green cross"])
    calls = []
    monkeypatch.setattr(embedding, "embed_images", lambda *a, **k: calls.append(a) or torch.zeros(1, bundle.embed_dim))
    assert torch.equal(first.images(uris), embedded)  # memory
    second = SuiteEmbedder(bundle, cache_dir=tmp_path / "cache")
    assert torch.equal(second.images(uris), embedded) and torch.equal(second.texts(["a green cross"]), texts)  # disk
    assert calls == []
    # other weights never reuse them
    with torch.no_grad():
        next(p for n, p in bundle.model.named_parameters() if n.startswith("visual.")).add_(1.0)
    SuiteEmbedder(bundle, cache_dir=tmp_path / "cache").images(uris)
    assert len(calls) == 1
