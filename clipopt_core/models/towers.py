"""Which parameters of an open_clip model each stage trains.

open_clip has two layouts: ``CLIP`` keeps the text tower's modules on the model itself
(``transformer.resblocks``, ``ln_final``, ``text_projection``), ``CustomTextCLIP`` keeps them
under ``model.text`` (an open_clip ``TextTransformer`` or a Hugging Face encoder with
``transformer.encoder.layer`` blocks and an optional ``proj``). These helpers hide that.
"""
from __future__ import annotations

import torch
from open_clip.transformer import PatchDropout, VisionTransformer
from timm.layers import PatchDropout as TimmPatchDropout
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of ``module``."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def visual_parameters(model: nn.Module, *, freeze_norm: bool) -> list[nn.Parameter]:
    """Parameters of the image tower (trunk + projector) to train.

    With ``freeze_norm`` the affine parameters of BatchNorm layers stay fixed too (see
    :func:`norm_layers_in_eval`); LayerNorms of ViTs still train, as in the paper.
    """
    frozen = {id(p) for m in model.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    return [p for p in model.visual.parameters() if not (freeze_norm and id(p) in frozen)]


def visual_projection(model: nn.Module) -> nn.Module | nn.Parameter:
    """The image tower's projector into the joint space (timm ``head`` or ViT ``proj``)."""
    visual = model.visual
    if hasattr(visual, "head") and hasattr(visual, "trunk"):
        return visual.head
    if getattr(visual, "proj", None) is not None:
        return visual.proj
    raise ValueError(f"{type(visual).__name__} has no recognised projector (expected timm 'head' or ViT 'proj')")


def text_blocks(model: nn.Module) -> nn.ModuleList:
    """The text tower's list of transformer blocks, input side first."""
    root = getattr(model, "text", model)
    transformer = getattr(root, "transformer", None)
    for path in ("resblocks", "encoder.layer", "layers", "layer"):
        candidate: object = transformer
        for attribute in path.split("."):
            candidate = getattr(candidate, attribute, None)
        if isinstance(candidate, nn.ModuleList):
            return candidate
    raise ValueError(f"cannot find the text blocks of {type(root).__name__}")


def text_tail_parameters(model: nn.Module, last_blocks: int) -> list[nn.Parameter]:
    """Parameters of the last ``last_blocks`` text blocks, the final norm and the text projection.

    ``logit_scale`` is not included (the realignment loss owns its own scale).
    """
    if last_blocks < 0:
        raise ValueError(f"last_blocks must be >= 0, got {last_blocks}")
    blocks = text_blocks(model)
    if last_blocks > len(blocks):
        raise ValueError(f"last_blocks={last_blocks} but the text tower has only {len(blocks)} blocks")
    root = getattr(model, "text", model)
    params: list[nn.Parameter] = []
    for block in list(blocks)[len(blocks) - last_blocks:]:
        params.extend(block.parameters())
    for name in ("ln_final", "proj"):
        module = getattr(root, name, None)
        if isinstance(module, nn.Module):
            params.extend(module.parameters())
    projection = getattr(root, "text_projection", None)
    if isinstance(projection, nn.Parameter):
        params.append(projection)
    elif isinstance(projection, nn.Module):
        params.extend(projection.parameters())
    return params


def no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """True for norms, biases, scalars and embeddings-like 1-D tensors (AdamW decay skipped)."""
    return parameter.ndim < 2 or name.endswith(".bias") or "logit_scale" in name or ".ln" in name or "norm" in name.lower()


def train_mode(module: nn.Module, *, freeze_norm: bool) -> None:
    """Put ``module`` in train mode, keeping BatchNorm layers in eval mode when ``freeze_norm``.

    On the EfficientNet starter tower, BatchNorm in train mode on emoji *lowered* held-out mAP
    from 0.23 to 0.12, so stages freeze norms by default (docs/method.md#frozen-norms): running
    statistics stay untouched and (see :func:`visual_parameters`) so do the affines.
    """
    module.train()
    if freeze_norm:
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()


def set_patch_dropout(visual: nn.Module, prob: float) -> None:
    """Drop a random ``prob`` share of the patch tokens of a ViT image tower while it trains.

    Works on open_clip ``VisionTransformer`` towers (their ``patch_dropout`` module; the class
    token is kept) and timm ViT trunks (``trunk.patch_drop``; prefix tokens kept) — the module
    the authors' ``force_patch_dropout`` sets. Both act only in train mode, so eval embeddings
    are unaffected. ``prob`` 0 removes it. Raises ``ValueError`` for a tower without patch
    tokens (e.g. a CNN) or ``prob`` outside [0, 1).
    """
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
    trunk = getattr(visual, "trunk", None)
    if isinstance(visual, VisionTransformer):
        visual.patch_dropout = PatchDropout(prob) if prob > 0 else nn.Identity()
    elif isinstance(getattr(trunk, "patch_drop", None), (nn.Identity, TimmPatchDropout)):
        trunk.patch_drop = TimmPatchDropout(prob, num_prefix_tokens=trunk.num_prefix_tokens) if prob > 0 else nn.Identity()
    elif prob > 0:
        kind = type(trunk if trunk is not None else visual).__name__
        raise ValueError(f"patch_dropout={prob} needs a ViT image tower with patch tokens, but this model's image "
                         f"tower is a {kind}; set patch_dropout to 0 for this model")
