"""Training losses for clipopt (docs/method.md#losses): ArcMargin, MCArcMargin and symmetric InfoNCE.

Pure torch; no dagster. All embeddings are L2-normalised inside the losses. ArcMargin and
MCArcMargin compute cosine, margin and logits in (at least) fp32 with autocast off, whatever
the caller's autocast: at s = 30 a bf16 logit moves in steps of 0.125, the size of the
margin's effect (docs/method.md#precision).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["arc_margin_logits", "cosine_fp32", "ArcMarginLoss", "MultiCaptionArcMarginLoss", "SymmetricInfoNCE"]

_SIN_EPS = 1e-7  # floor on sin^2 so d sqrt/d cos stays finite at cos = +-1


def arc_margin_logits(cosine: Tensor, target_mask: Tensor, margin: float) -> Tensor:
    """Apply the additive angular (ArcFace) margin to the target entries of ``cosine``.

    cosine: [..., K] cosine similarities in [-1, 1]; target_mask: bool [..., K].
    Returns [..., K] (not scaled): where ``target_mask``, ``cos(θ + m)`` while
    ``cos θ > cos(π − m)`` and ``cos θ − m·sin(π − m)`` otherwise; elsewhere ``cos θ``.
    Finite, with finite gradients, at ``cos θ = ±1`` (cosine clamped, sin² floored before sqrt).
    """
    if margin == 0.0:
        return cosine
    cos = cosine.clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=_SIN_EPS))
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    phi = cos * cos_m - sin * sin_m  # cos(θ + m)
    threshold = math.cos(math.pi - margin)
    fallback = cos - margin * math.sin(math.pi - margin)
    phi = torch.where(cos > threshold, phi, fallback)
    return torch.where(target_mask, phi, cosine)


def cosine_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities [M, K] of rows of ``a`` [M, D] and ``b`` [K, D], in at least fp32.

    Call inside ``torch.autocast(..., enabled=False)``: inputs are cast up (fp64 stays fp64),
    normalised, and multiplied in that precision.
    """
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return F.normalize(a.to(dtype), dim=-1) @ F.normalize(b.to(dtype), dim=-1).t()


class ArcMarginLoss(nn.Module):
    """ArcMargin (ArcFace) loss against learnable class proxies.

    ``proxies``: parameter [C, D], Xavier-uniform init, rows L2-normalised in ``forward``.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.1) -> None:
        super().__init__()
        self.scale = float(scale)
        self.margin = float(margin)
        self.proxies = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.proxies)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """embeddings [B, D] (normalised inside), labels long [B] in [0, C) -> fp32 scalar mean CE."""
        with torch.autocast(embeddings.device.type, enabled=False):
            cosine = cosine_fp32(embeddings, self.proxies)  # [B, C]
            target = F.one_hot(labels, num_classes=cosine.shape[1]).bool()
            logits = self.scale * arc_margin_logits(cosine, target, self.margin)
            return F.cross_entropy(logits, labels)


MaxNegative = Literal["authors", "hardest"]


class MultiCaptionArcMarginLoss(nn.Module):
    """MCArcMargin: ArcMargin of each image against the (frozen) captions of the whole batch.

    For image i (normalised x_i) and caption k (normalised e_k): ``c_ik = x_i·e_k``; the margin
    is applied to every own caption (``caption_owner[k] == i``); logits ``z_ik = s·c'_ik`` [B, N];
    ``log p_ik = log_softmax_k(z_ik)`` over all N captions (other images' captions are negatives);
    soft target ``t_ik = 1/n_i`` on own captions (an all-zero row for an image with none).

    ``max_negative="authors"`` (default, the authors' code; docs/method.md#mc-loss)::

        loss_i = Σ_k −t_ik·log p_ik + w · max_k [ −(1 − t_ik)·log p_ik ]

    averaged over **all** B images: an image without captions contributes its max term only, and
    the max runs over own captions too (weight 1 − 1/n_i), so it picks the least probable caption.

    ``max_negative="hardest"`` (our alternative): ``loss_i = Σ_k −t_ik·log p_ik + w · [−log(1 − p_ik*)]``
    with k* the most probable caption of another image, averaged over the images with captions;
    it is ≥ 0 and pushes the hardest negative down (``∂/∂z_ik* = p_ik*``). Computed stably as
    ``logsumexp_l z_il − logsumexp_{l≠k*} z_il``; 0 when no other image has captions.

    ``w = max_negative_weight``; 0 disables the extra term in both forms.
    """

    def __init__(self, scale: float = 30.0, margin: float = 0.1, max_negative_weight: float = 0.1,
                 max_negative: MaxNegative = "authors") -> None:
        super().__init__()
        if max_negative not in ("authors", "hardest"):
            raise ValueError(f"max_negative must be 'authors' or 'hardest', got {max_negative!r}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.max_negative_weight = float(max_negative_weight)
        self.max_negative = max_negative

    def forward(self, image_embeddings: Tensor, caption_embeddings: Tensor, caption_owner: Tensor) -> Tensor:
        """image_embeddings [B, D]; caption_embeddings [N, D] (all captions of the batch, concatenated);
        caption_owner long [N], values in [0, B): owning image of each caption -> fp32 scalar.

        With no caption at all (N = 0) the result is a zero that keeps the graph (``0 · sum``).
        """
        if caption_embeddings.shape[0] == 0:
            return 0.0 * (image_embeddings.sum() + caption_embeddings.sum()).float()
        batch = image_embeddings.shape[0]
        own = caption_owner.view(1, -1) == torch.arange(batch, device=caption_owner.device).view(-1, 1)  # [B, N]
        with torch.autocast(image_embeddings.device.type, enabled=False):
            logits = self.scale * arc_margin_logits(cosine_fp32(image_embeddings, caption_embeddings), own, self.margin)
            log_p = logits.log_softmax(dim=1)  # [B, N]
            n_own = own.sum(dim=1, keepdim=True)  # [B, 1]
            target = own.to(log_p.dtype) / n_own.clamp(min=1).to(log_p.dtype)  # all-zero rows stay zero
            loss = -(target * log_p).sum(dim=1)  # [B]
            if self.max_negative == "hardest":
                return self._hardest(loss, logits, own, n_own.squeeze(1) > 0)
            if self.max_negative_weight:
                loss = loss + self.max_negative_weight * (-(1.0 - target) * log_p).amax(dim=1)
            return loss.mean()

    def _hardest(self, loss: Tensor, logits: Tensor, own: Tensor, has: Tensor) -> Tensor:
        """Mean over captioned images of CE + w·(−log(1 − p)) of the most probable other image's caption."""
        loss, logits, own = loss[has], logits[has], own[has]
        # every caption of another captioned image is a negative for all rows, so either all rows
        # have negatives (>= 2 captioned images) or none does (the extra term is then 0)
        if self.max_negative_weight and logits.shape[0] > 1:
            hardest = logits.masked_fill(own, float("-inf")).argmax(dim=1, keepdim=True)  # [B', 1]
            without = logits.scatter(1, hardest, float("-inf")).logsumexp(dim=1)  # >= 1 own caption left
            loss = loss + self.max_negative_weight * (logits.logsumexp(dim=1) - without)
        return loss.mean()


class SymmetricInfoNCE(nn.Module):
    """CLIP's symmetric InfoNCE with a learnable log-space logit scale.

    ``logit_scale``: scalar parameter; the logits are scaled by ``exp(logit_scale)`` with no clamp
    in the forward pass (a clamp there would zero its gradient and pin it). As in open_clip
    training, which the authors' realignment uses, call :meth:`clamp_logit_scale_` after every
    optimizer step to clamp the *parameter* in place to ``[0, ln max_logit_scale]``
    (docs/method.md#realignment).
    """

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def effective_scale(self) -> Tensor:
        """Scalar tensor: ``exp(logit_scale)``, the factor applied to the cosines."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place to ``[0, ln max_logit_scale]`` (scale in [1, max_logit_scale])."""
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def forward(self, image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """image_embeddings [B, D], text_embeddings [B, D] (pair i ↔ i; normalised inside) -> scalar
        mean of the image→text and text→image cross-entropies with targets arange(B)."""
        img = F.normalize(image_embeddings, dim=-1)
        txt = F.normalize(text_embeddings, dim=-1).to(img.dtype)
        logits = self.effective_scale().to(img.dtype) * (img @ txt.t())  # [B, B]
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
