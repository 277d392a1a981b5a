"""Training losses for clipopt (docs/method.md#losses): ArcMargin, MCArcMargin and symmetric InfoNCE.

Pure torch; no dagster. All embeddings are L2-normalised inside the losses. ArcMargin and
MCArcMargin compute cosine, margin and logits in (at least) fp32 with autocast off, whatever
the caller's autocast: at s = 30 a bf16 logit moves in steps of 0.125, the size of the
margin's effect (docs/method.md#precision).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from clipopt_core.runtime import distributed

__all__ = ["arc_margin", "arc_margin_logits", "cosine_fp32", "ArcMarginLoss", "MultiCaptionArcMarginLoss",
           "SymmetricInfoNCE", "ProxyDtype", "ProxySharding"]

_SIN_EPS = 1e-7  # floor on sin^2 so d sqrt/d cos stays finite at cos = +-1
_NORM_EPS = 1e-12  # F.normalize's floor on a row norm

ProxyDtype = Literal["fp32", "bf16"]
ProxySharding = Literal["replicated", "sharded"]


def arc_margin(cosine: Tensor, margin: float) -> Tensor:
    """The additive angular (ArcFace) margin of target cosines, elementwise, not scaled.

    cosine: [...] in [-1, 1]. Returns [...]: ``cos(θ + m)`` while ``cos θ > cos(π − m)`` and
    ``cos θ − m·sin(π − m)`` otherwise; ``cosine`` itself when ``margin`` is 0. Finite, with finite
    gradients, at ``cos θ = ±1`` (cosine clamped, sin² floored before sqrt; docs/method.md#losses).
    """
    if margin == 0.0:
        return cosine
    cos = cosine.clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=_SIN_EPS))
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    phi = cos * cos_m - sin * sin_m  # cos(θ + m)
    threshold = math.cos(math.pi - margin)
    fallback = cos - margin * math.sin(math.pi - margin)
    return torch.where(cos > threshold, phi, fallback)


def arc_margin_logits(cosine: Tensor, target_mask: Tensor, margin: float) -> Tensor:
    """:func:`arc_margin` on the target entries of ``cosine``, ``cosine`` elsewhere.

    cosine: [..., K] cosine similarities; target_mask: bool [..., K]. Returns [..., K] (not scaled).
    """
    if margin == 0.0:
        return cosine
    return torch.where(target_mask, arc_margin(cosine, margin), cosine)


def cosine_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities [M, K] of rows of ``a`` [M, D] and ``b`` [K, D], in at least fp32.

    Call inside ``torch.autocast(..., enabled=False)``: inputs are cast up (fp64 stays fp64),
    normalised, and multiplied in that precision.
    """
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return F.normalize(a.to(dtype), dim=-1) @ F.normalize(b.to(dtype), dim=-1).t()


class _ArcMarginCrossEntropy(torch.autograd.Function):
    """Mean ArcMargin cross-entropy of normalised features against (a row shard of) the proxies.

    One [B, C_l] buffer: the cosines become the logits in place (s·cos, the target entry s·φ), the
    softmax is formed in place in the backward pass, and the margin touches only the B target entries
    (gather/index-put). The proxies are normalised here too, with the backward of ``F.normalize``
    written out in place (``(g − ŵ(ŵ·g)) / ‖w‖``): autograd's version makes ~6 [C, D] temporaries and
    took most of the step at D = 512 > B. With ``sharded`` every rank holds classes
    ``[offset, offset + C_l)`` of the same global batch: the row max, the sum of exponentials and the
    target logit are all-reduced (model-parallel softmax), and the feature gradient is all-reduced so
    that every rank gets the gradient of the global loss, as
    :func:`~clipopt_core.runtime.distributed.gather_rows` expects.
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, proxies: Tensor, labels: Tensor, offset: int, scale: float, margin: float,
                matmul_dtype: torch.dtype, sharded: bool) -> Tensor:
        """features [B, D] (normalised), proxies [C_l, D] (raw), both fp32/fp64; labels long [B] (global ids) -> scalar."""
        reduce = distributed.all_reduce_ if sharded else (lambda tensor, op="sum": tensor)
        norm = proxies.norm(dim=1, keepdim=True)  # [C_l, 1]
        unit = proxies / norm.clamp_min(_NORM_EPS)  # F.normalize
        lhs = features.to(matmul_dtype)
        logits = (lhs @ unit.to(matmul_dtype).t()).to(features.dtype)  # [B, C_l] cosines, then logits in place
        local = labels - offset
        rows = ((local >= 0) & (local < logits.shape[1])).nonzero().squeeze(1)  # rows whose target is here
        cols = local[rows]
        with torch.enable_grad():  # the margin and its slope on the [B_l] target cosines only
            target = logits[rows, cols].detach().requires_grad_(True)
            phi = arc_margin(target, margin)
            (slope,) = torch.autograd.grad(phi.sum(), target)  # φ'(cos) exactly as autograd of φ gives it
        logits.mul_(scale)
        logits[rows, cols] = scale * phi.detach()
        row_max = reduce(logits.amax(dim=1), "max")  # [B]
        lse = row_max + reduce((logits - row_max[:, None]).exp_().sum(dim=1)).log()  # [B]
        target_logit = reduce(torch.zeros_like(lse).index_put_((rows,), logits[rows, cols]))
        ctx.save_for_backward(logits, lse, lhs, unit, norm, rows, cols, slope)
        ctx.scale, ctx.sharded, ctx.dtype = scale, sharded, features.dtype
        return (lse - target_logit).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, lse, lhs, unit, norm, rows, cols, slope = ctx.saved_tensors
        probs = logits.sub_(lse[:, None]).exp_()  # softmax over all classes, this rank's columns [B, C_l]
        probs[rows, cols] = (probs[rows, cols] - 1.0) * slope  # d/dcos of the target: (p − 1)·φ'
        probs.mul_(grad * ctx.scale / probs.shape[0])
        g = probs.to(lhs.dtype)
        grad_features = (g @ unit.to(lhs.dtype)).to(ctx.dtype)  # [B, D]
        if ctx.sharded:
            distributed.all_reduce_(grad_features)  # each rank saw C_l of the classes
        grad_unit = (g.t() @ lhs).to(ctx.dtype)  # [C_l, D], then d/dw of F.normalize in place
        radial = torch.linalg.vecdot(unit, grad_unit, dim=1).unsqueeze(1) * (norm > _NORM_EPS)  # [C_l, 1]
        grad_proxies = grad_unit.addcmul_(unit, radial, value=-1.0).div_(norm.clamp_min(_NORM_EPS))
        return grad_features, grad_proxies, None, None, None, None, None, None


class ArcMarginLoss(nn.Module):
    """ArcMargin (ArcFace) loss against learnable class proxies (docs/method.md#losses).

    ``proxies``: parameter [C, D] (fp32), Xavier-uniform init, rows L2-normalised in ``forward``.
    ``proxy_dtype``: ``fp32`` computes the cosine matmuls in fp32 (fp64 if an input is fp64);
    ``bf16`` multiplies bf16 copies of the normalised features and proxies (fp32 accumulation) in the
    forward and both backward matmuls. The parameter, its gradient, AdamW's moments (fp32 master
    weights), the margin, the softmax and the cross-entropy stay fp32 in both.
    ``sharding``: ``replicated`` (default) keeps all C rows on every rank, the local batch's mean
    is the loss and the proxy gradient is averaged with the tower's. ``sharded`` keeps this rank's
    rows ``[offset, offset + C/W)`` of rank 0's initial proxies (a row-sharded parameter, see
    :func:`~clipopt_core.runtime.distributed.mark_row_sharded`), gathers the features and labels of
    the global batch and returns the global batch's mean: the same loss and weights as ``replicated``.
    Outside ``torchrun`` both are the one-process loss.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.1, *,
                 proxy_dtype: ProxyDtype = "fp32", sharding: ProxySharding = "replicated") -> None:
        super().__init__()
        if proxy_dtype not in ("fp32", "bf16"):
            raise ValueError(f"proxy_dtype must be 'fp32' or 'bf16', got {proxy_dtype!r}")
        if sharding not in ("replicated", "sharded"):
            raise ValueError(f"proxy sharding must be 'replicated' or 'sharded', got {sharding!r}")
        if sharding == "sharded" and num_classes < distributed.world_size():
            raise ValueError(f"sharded proxies need at least one class per rank: {num_classes} classes, "
                             f"{distributed.world_size()} ranks; use proxy_sharding 'replicated'")
        self.scale, self.margin = float(scale), float(margin)
        self.proxy_dtype, self.sharded = proxy_dtype, sharding == "sharded"
        proxies = torch.empty(num_classes, embed_dim)
        nn.init.xavier_uniform_(proxies)  # the full matrix on every rank: the same RNG draws in both modes
        self.offset = 0
        if self.sharded:
            distributed.broadcast_tensor_(proxies)  # rank 0's proxies, as broadcast_modules gives replicated ones
            self.offset = distributed.row_range(num_classes)[0]
            proxies = distributed.row_shard(proxies)
        self.proxies = nn.Parameter(proxies)
        if self.sharded:
            distributed.mark_row_sharded(self.proxies)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """embeddings [B, D] (normalised inside), labels long [B] in [0, C) -> fp32 scalar mean CE
        (fp64 when an input is fp64); sharded: the mean over the global batch."""
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = torch.float64 if torch.float64 in (embeddings.dtype, self.proxies.dtype) else torch.float32
            features = F.normalize(embeddings.to(dtype), dim=-1)
            if self.sharded:
                features, labels = distributed.gather_rows(features), distributed.gather_rows(labels)
            matmul_dtype = torch.bfloat16 if self.proxy_dtype == "bf16" else dtype
            return _ArcMarginCrossEntropy.apply(features, self.proxies.to(dtype), labels, self.offset, self.scale, self.margin,
                                                matmul_dtype, self.sharded)


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
