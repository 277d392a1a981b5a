"""Unit tests for clipopt_core.models.loading (loading, export, offline errors, unsafe checkpoints) and
clipopt_core.models.towers (which parameters each stage trains), on the tiny registered model."""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from clipopt_core.models import towers
from clipopt_core.models.loading import (
    CONFIG_FILE,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    ModelSpec,
    ModelUnavailableError,
    checkpoint_spec,
    export_checkpoint,
    load_model,
)

TINY = ModelSpec("clipopt-tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(7)
    return load_model(TINY, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "stage1"
    return export_checkpoint(tiny, folder, {"stage": "stage1", "best_val_score": 0.5, "steps": 12})


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ load / export

def test_load_tiny_bundle(tiny):
    assert tiny.open_clip_name == "clipopt-tiny"
    assert tiny.image_size == 32 and tiny.embed_dim == 32
    assert tiny.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # open_clip's OpenAI defaults
    assert not tiny.model.training
    assert sum(p.numel() for p in tiny.model.parameters()) == pytest.approx(1.7e6, rel=0.05)
    tokens = tiny.tokenizer(["a red circle"])
    assert tokens.shape == (1, 16)  # context_length of the tiny config


def test_export_loads_with_plain_open_clip_both_ways(tiny, exported: Path):
    with torch.no_grad():
        expected = tiny.model.encode_image(_images())
        expected_text = tiny.model.encode_text(tiny.tokenizer(["a blue square"]))

    local, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    by_file, _, _ = open_clip.create_model_and_transforms("clipopt-tiny", pretrained=str(exported / WEIGHTS_FILE))
    for model in (local, by_file):
        model.eval()
        with torch.no_grad():
            assert torch.equal(model.encode_image(_images()), expected)
            assert torch.equal(model.encode_text(tiny.tokenizer(["a blue square"])), expected_text)
    # the preprocessing config travels with the folder
    assert local.visual.preprocess_cfg["mean"] == pytest.approx(tiny.mean)

    # and clipopt's own loader reads it back through checkpoint_spec
    bundle = load_model(checkpoint_spec(exported), cache_dir=exported.parent)
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(_images()), expected)
    assert bundle.image_size == 32


def test_export_folder_contents_and_sidecar(tiny, exported: Path):
    assert sorted(p.name for p in exported.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE])
    assert not [p for p in exported.parent.iterdir() if ".tmp-" in p.name]  # staging folder renamed away
    sidecar = json.loads((exported / SIDECAR_FILE).read_text())
    assert sidecar["base_model"] == {"name": "clipopt-tiny", "pretrained": None, "image_size": None}
    assert sidecar["open_clip_name"] == "clipopt-tiny"
    assert (sidecar["stage"], sidecar["best_val_score"], sidecar["steps"]) == ("stage1", 0.5, 12)
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["model_cfg"]["embed_dim"] == 32
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["model_cfg"]["text_cfg"]["layers"] == 2
    assert config["preprocess_cfg"]["mean"] == pytest.approx(list(tiny.mean))
    assert config["preprocess_cfg"]["interpolation"] == tiny.interpolation


def test_export_replaces_an_existing_folder(tiny, tmp_path: Path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    export_checkpoint(tiny, folder, {"stage": "x"})
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / SIDECAR_FILE).read_text())["stage"] == "x"


def test_checkpoint_spec_rejects_non_checkpoint(tmp_path: Path):
    with pytest.raises(ModelUnavailableError, match=CONFIG_FILE):
        checkpoint_spec(tmp_path)


def test_local_dir_without_config_fails_clearly(tmp_path: Path):
    with pytest.raises(ModelUnavailableError, match="has no open_clip_config.json"):
        load_model(ModelSpec(f"local-dir:{tmp_path}"), cache_dir=tmp_path)


def test_force_image_size(tmp_path: Path):
    bundle = load_model(ModelSpec("clipopt-tiny", image_size=48), cache_dir=tmp_path)
    assert bundle.image_size == 48
    with torch.no_grad():
        assert bundle.model.encode_image(torch.zeros(1, 3, 48, 48)).shape == (1, 32)


# ------------------------------------------------------------------ failing fast and safely

def test_unknown_name_lists_close_matches(tmp_path: Path):
    with pytest.raises(ModelUnavailableError) as info:
        load_model(ModelSpec("ViT-B-23", pretrained="openai"), cache_dir=tmp_path)
    message = str(info.value)
    assert "unknown model name 'ViT-B-23'" in message
    assert "Close matches:" in message and "ViT-B-32" in message


def test_unknown_tag_lists_known_tags(tmp_path: Path):
    with pytest.raises(ModelUnavailableError) as info:
        load_model(ModelSpec("ViT-B-32", pretrained="no-such-tag"), cache_dir=tmp_path)
    assert "'no-such-tag'" in str(info.value) and "openai" in str(info.value)


def test_uncached_tag_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPOPT_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_model(ModelSpec("ViT-B-32", pretrained="openai"), cache_dir=tmp_path)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert "ViT-B-32/openai" in message and "not in the local cache" in message
    assert "pretrained='/path/to/open_clip_model.safetensors'" in message  # how to provide the file
    assert "CLIPOPT_ALLOW_DOWNLOAD=1" in message


def test_uncached_hf_hub_name_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.delenv("CLIPOPT_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ModelUnavailableError, match="local-dir:"):
        load_model(ModelSpec("hf-hub:someone/some-clip"), cache_dir=tmp_path)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_code_executing_pickle_is_refused(tiny, tmp_path: Path):
    # control: the payload really is live when unpickled without weights_only
    control_marker = tmp_path / "control-ran"
    torch.save({"state_dict": {"x": _Payload(control_marker)}}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "payload-ran"
    weights = tmp_path / "evil.pt"
    state = {key: value for key, value in tiny.model.state_dict().items()}
    torch.save({"state_dict": {**state, "evil": _Payload(marker)}}, weights)
    with pytest.raises(ModelUnavailableError, match="cannot load model"):
        load_model(ModelSpec("clipopt-tiny", pretrained=str(weights)), cache_dir=tmp_path)
    assert not marker.exists()


def test_plain_tensor_pickle_is_accepted(tiny, tmp_path: Path):
    # the refusal is about code, not about the .pt format: plain tensors still load
    weights = tmp_path / "plain.pt"
    torch.save({"state_dict": tiny.model.state_dict()}, weights)
    bundle = load_model(ModelSpec("clipopt-tiny", pretrained=str(weights)), cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(_images()), tiny.model.encode_image(_images()))


# ------------------------------------------------------------------ towers

def test_text_tail_parameters_counts(tiny):
    model = tiny.model
    block = list(model.transformer.resblocks[1].parameters())
    assert len(block) == 12  # ln_1 (2) + attn in/out (4) + ln_2 (2) + mlp c_fc/c_proj (4)
    counts = {n: len(towers.text_tail_parameters(model, n)) for n in (0, 1, 2)}
    assert counts == {0: 3, 1: 15, 2: 27}  # + ln_final (2) + text_projection (1)
    tail = {id(p) for p in towers.text_tail_parameters(model, 1)}
    assert all(id(p) in tail for p in block)
    assert not any(id(p) in tail for p in model.transformer.resblocks[0].parameters())
    assert id(model.text_projection) in tail and id(model.ln_final.weight) in tail
    assert id(model.logit_scale) not in tail and id(model.token_embedding.weight) not in tail
    with pytest.raises(ValueError, match="only 2 blocks"):
        towers.text_tail_parameters(model, 3)
    with pytest.raises(ValueError, match=">= 0"):
        towers.text_tail_parameters(model, -1)


@pytest.mark.parametrize(("name", "shape", "expected"), [
    ("transformer.resblocks.0.ln_1.weight", (32,), True),
    ("transformer.resblocks.0.attn.in_proj_bias", (96,), True),
    ("visual.head.proj.bias", (32,), True),
    ("logit_scale", (), True),
    ("visual.trunk.bn1.weight", (24,), True),
    ("text.norm_layer.weight", (4, 4), True),  # a norm by name even if not 1-D
    ("ln_final.weight", (32,), True),
    ("transformer.resblocks.0.attn.in_proj_weight", (96, 32), False),
    ("transformer.resblocks.0.mlp.c_fc.weight", (128, 32), False),
    ("text_projection", (32, 32), False),
    ("visual.trunk.conv_stem.weight", (24, 3, 3, 3), False),
    ("token_embedding.weight", (49408, 32), False),
])
def test_no_weight_decay_rules(name: str, shape: tuple[int, ...], expected: bool):
    assert towers.no_weight_decay(name, torch.empty(shape)) is expected


def test_visual_parameters_and_projector(tiny):
    model = tiny.model
    everything = list(model.visual.parameters())
    bn = [p for m in model.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
    assert bn
    assert len(towers.visual_parameters(model, freeze_norm=False)) == len(everything)
    frozen = towers.visual_parameters(model, freeze_norm=True)
    assert len(frozen) == len(everything) - len(bn)
    assert not {id(p) for p in bn} & {id(p) for p in frozen}
    assert towers.visual_projection(model) is model.visual.head  # timm tower: the head is the projector
    assert isinstance(towers.text_blocks(model), nn.ModuleList) and len(towers.text_blocks(model)) == 2


def test_train_mode_keeps_batchnorm_in_eval(tiny):
    visual = tiny.model.visual
    try:
        towers.train_mode(visual, freeze_norm=True)
        layers = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert visual.training and visual.trunk.conv_stem.training
        assert layers and not any(layer.training for layer in layers)
        towers.train_mode(visual, freeze_norm=False)
        assert all(layer.training for layer in layers)
    finally:
        tiny.model.eval()


def test_freeze_stops_all_gradients(tmp_path: Path):
    bundle = load_model(TINY, cache_dir=tmp_path)
    towers.freeze(bundle.model)
    assert not any(p.requires_grad for p in bundle.model.parameters())
