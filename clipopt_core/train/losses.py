"""Training losses for clipopt (METHOD.md): ArcMargin, MCArcMargin and symmetric InfoNCE.

Pure torch; no dagster. All embeddings are L2-normalised inside the losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["arc_margin_logits", "ArcMarginLoss", "MultiCaptionArcMarginLoss", "SymmetricInfoNCE"]

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
        """embeddings [B, D] (normalised inside), labels long [B] in [0, C) -> scalar mean CE."""
        x = F.normalize(embeddings, dim=-1)
        w = F.normalize(self.proxies, dim=-1).to(x.dtype)
        cosine = x @ w.t()  # [B, C]
        target = F.one_hot(labels, num_classes=cosine.shape[1]).bool()
        logits = self.scale * arc_margin_logits(cosine, target, self.margin)
        return F.cross_entropy(logits, labels)


class MultiCaptionArcMarginLoss(nn.Module):
    """MCArcMargin: ArcMargin of each image against the (frozen) captions of the whole batch.

    For image i (normalised x_i) and caption k (normalised e_k): ``c_ik = x_i·e_k``; the
    margin is applied to every own caption (``caption_owner[k] == i``); logits ``z_ik = s·c'_ik``;
    ``p_ik = softmax_k(z_ik)`` over all N captions (other images' captions are negatives).

    ``loss_i = −Σ_{k own} (1/n_i) log p_ik + w · max_{k neg} [−log(1 − p_ik)]``, averaged over the
    images with n_i ≥ 1 (the extra term is 0 when only one image has captions: no negatives).

    Extra term: METHOD.md paraphrases the authors' code as "0.1 × max over negatives of (−log p_ik)".
    Taken literally that picks the *easiest* negative (smallest p) and minimising it would *raise* a
    negative's probability, which contradicts a negative. The evident intent is a hardest-negative
    penalty, so we use ``−log(1 − p_ik)`` of the most probable negative: it is ≥ 0, ≈ 0 when the
    negative is already unlikely, grows without bound as p_ik → 1, and its gradient pushes that
    negative's logit down (∂/∂z_ik = p_ik). (``max log p_ik`` would also push it down but is
    unbounded below, so it never stops rewarding.) Computed stably as
    ``logsumexp_l z_il − logsumexp_{l≠k*} z_il`` with k* the hardest negative. ``w = 0`` disables it.
    """

    def __init__(self, scale: float = 30.0, margin: float = 0.1, max_negative_weight: float = 0.1) -> None:
        super().__init__()
        self.scale = float(scale)
        self.margin = float(margin)
        self.max_negative_weight = float(max_negative_weight)

    def forward(self, image_embeddings: Tensor, caption_embeddings: Tensor, caption_owner: Tensor) -> Tensor:
        """image_embeddings [B, D]; caption_embeddings [N, D] (all captions of the batch, concatenated);
        caption_owner long [N], values in [0, B): owning image of each caption -> scalar.

        Images with no caption contribute nothing; if none has a caption the result is a zero
        that keeps the graph (``0 · sum`` of the embeddings).
        """
        batch = image_embeddings.shape[0]
        own = caption_owner.view(1, -1) == torch.arange(batch, device=caption_owner.device).view(-1, 1)  # [B, N]
        n_own = own.sum(dim=1)  # [B]
        has = n_own > 0
        if not bool(has.any()):
            return 0.0 * (image_embeddings.sum() + caption_embeddings.sum())
        x = F.normalize(image_embeddings[has], dim=-1)  # [B', D]
        e = F.normalize(caption_embeddings, dim=-1).to(x.dtype)  # [N, D]
        own = own[has]
        logits = self.scale * arc_margin_logits(x @ e.t(), own, self.margin)  # [B', N]
        log_p = logits.log_softmax(dim=1)
        target = own.to(log_p.dtype) / n_own[has].unsqueeze(1).to(log_p.dtype)
        loss = -(target * log_p).sum(dim=1)  # [B']
        # Every caption of another captioned image is a negative for all rows, so either all rows
        # have negatives (>= 2 captioned images) or none does (the extra term is then 0).
        if self.max_negative_weight != 0.0 and int(has.sum()) > 1:
            hardest = logits.masked_fill(own, float("-inf")).argmax(dim=1, keepdim=True)  # [B', 1]
            without = logits.scatter(1, hardest, float("-inf")).logsumexp(dim=1)  # >= 1 own caption left
            loss = loss + self.max_negative_weight * (logits.logsumexp(dim=1) - without)
        return loss.mean()


class SymmetricInfoNCE(nn.Module):
    """CLIP's symmetric InfoNCE with a learnable log-space logit scale.

    ``logit_scale``: scalar parameter; effective scale ``exp(logit_scale).clamp(max=max_logit_scale)``.
    """

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def effective_scale(self) -> Tensor:
        """Scalar tensor: exp(logit_scale) clamped to ≤ max_logit_scale."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """image_embeddings [B, D], text_embeddings [B, D] (pair i ↔ i; normalised inside) -> scalar
        mean of the image→text and text→image cross-entropies with targets arange(B)."""
        img = F.normalize(image_embeddings, dim=-1)
        txt = F.normalize(text_embeddings, dim=-1).to(img.dtype)
        logits = self.effective_scale().to(img.dtype) * (img @ txt.t())  # [B, B]
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
