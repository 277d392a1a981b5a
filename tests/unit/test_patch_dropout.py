"""Patch dropout on ViT image towers (clipopt_core.models.towers.set_patch_dropout, RetrievalConfig.patch_dropout).

Two tiny ViTs are registered here (random init), both at 32 px with a class token: an open_clip
``VisionTransformer`` with 8 px patches (16 patch tokens) and a timm ``test_vit`` trunk with 16 px
patches (4 patch tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from clipopt_core.data.datasets import ImageDataset, train_transform
from clipopt_core.data.manifest import scan_source
from clipopt_core.models import towers
from clipopt_core.models.loading import ClipBundle, ModelSpec, load_model
from clipopt_core.train.config import RetrievalConfig
from clipopt_core.train.tasks import RetrievalTask

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "clipopt-test-vit": {"embed_dim": 16, "text_cfg": TEXT_CFG,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}},
    "clipopt-test-timm-vit": {"embed_dim": 16, "text_cfg": TEXT_CFG,
                              "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                             "timm_pool": "", "timm_proj": "linear", "image_size": 32}},
}
# (tokens without dropout, tokens kept with half the patches dropped), class token included
TOKENS = {"clipopt-test-vit": (1 + 16, 1 + 8), "clipopt-test-timm-vit": (1 + 4, 1 + 2)}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vit-configs")
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return tmp_path_factory.mktemp("model-cache")


def vit(cache_dir: Path, name: str) -> ClipBundle:
    torch.manual_seed(0)
    return load_model(ModelSpec(name), cache_dir=cache_dir)


def dropout_module(visual: nn.Module) -> nn.Module:
    return visual.trunk.patch_drop if hasattr(visual, "trunk") else visual.patch_dropout


def tokens_after_dropout(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(embeddings, number of tokens leaving the patch-dropout module) for one forward pass."""
    seen: list[int] = []
    handle = dropout_module(visual).register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        return visual(images), seen[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patch_dropout_acts_in_training_only(cache_dir: Path, name: str):
    bundle = vit(cache_dir, name)
    visual = bundle.model.visual
    all_tokens, kept_at_half = TOKENS[name]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before, tokens = tokens_after_dropout(visual.eval(), images)
    assert tokens == all_tokens
    towers.set_patch_dropout(visual, 0.5)
    visual.train()
    first, kept = tokens_after_dropout(visual, images)
    second, _ = tokens_after_dropout(visual, images)
    assert kept == kept_at_half
    assert not torch.equal(first, second)  # a different random half each pass
    after, tokens = tokens_after_dropout(visual.eval(), images)
    assert tokens == all_tokens and torch.equal(after, before)  # eval embeddings unaffected
    towers.set_patch_dropout(visual, 0.0)
    assert isinstance(dropout_module(visual), nn.Identity)


def test_patch_dropout_needs_patch_tokens(cache_dir: Path):
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=cache_dir)  # an EfficientNet tower
    with pytest.raises(ValueError, match="patch_dropout=0.33 needs a ViT.*EfficientNet.*set patch_dropout to 0"):
        towers.set_patch_dropout(bundle.model.visual, 0.33)
    towers.set_patch_dropout(bundle.model.visual, 0.0)  # 0 is always fine
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        towers.set_patch_dropout(vit(cache_dir, "clipopt-test-vit").model.visual, 1.0)


def _task(cache_dir: Path, shapes_source: Path, name: str, patch_dropout: float) -> RetrievalTask:
    bundle = vit(cache_dir, name) if name != "clipopt-tiny" else load_model(ModelSpec(name), cache_dir=cache_dir)
    uris = [str(shapes_source / p) for p in scan_source(str(shapes_source))["path"].to_list()[:8]]
    dataset = ImageDataset(uris, list(range(8)), train_transform(32, bundle.mean, bundle.std))
    return RetrievalTask(bundle, dataset, 8, RetrievalConfig(patch_dropout=patch_dropout), lambda bundle: 0.0)


def test_retrieval_task_applies_patch_dropout_while_training(cache_dir: Path, shapes_source: Path):
    task = _task(cache_dir, shapes_source, "clipopt-test-vit", 0.5)
    visual = task.bundle.model.visual
    all_tokens, kept_at_half = TOKENS["clipopt-test-vit"]
    images = torch.randn(2, 3, 32, 32)
    task.train_mode()
    assert tokens_after_dropout(visual, images)[1] == kept_at_half
    task.validate()  # validation puts the model in eval mode
    assert tokens_after_dropout(visual, images)[1] == all_tokens
    plain = _task(cache_dir, shapes_source, "clipopt-test-vit", 0.0)
    plain.train_mode()
    assert tokens_after_dropout(plain.bundle.model.visual, images)[1] == all_tokens
    with pytest.raises(ValueError, match="patch_dropout"):
        _task(cache_dir, shapes_source, "clipopt-tiny", 0.33)
