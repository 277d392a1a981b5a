"""Unit tests for clipopt_core.train.losses, checked against values computed with plain python math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipopt_core.train.losses import (
    ArcMarginLoss,
    MultiCaptionArcMarginLoss,
    SymmetricInfoNCE,
    arc_margin_logits,
    cosine_fp32,
)
from clipopt_core.runtime.distributed import proxy_memory_bytes

S, M = 30.0, 0.1


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def vecs(*angles: float) -> torch.Tensor:
    return torch.tensor([unit(a) for a in angles], dtype=torch.float64)


def margin_ref(c: float, m: float) -> float:
    """ArcFace margin on one target cosine, plain math."""
    if c > math.cos(math.pi - m):
        return math.cos(math.acos(c) + m)
    return c - m * math.sin(math.pi - m)


def log_softmax_ref(z: list[float]) -> list[float]:
    mx = max(z)
    lse = mx + math.log(sum(math.exp(v - mx) for v in z))
    return [v - lse for v in z]


# ---------------------------------------------------------------- arc_margin_logits / ArcMarginLoss


@pytest.mark.parametrize("m", [0.1, 0.5])
def test_arc_margin_logits_both_branches(m: float) -> None:
    thr = math.cos(math.pi - m)
    cos = torch.tensor([0.9, 0.2, thr + 1e-3, thr - 1e-3, -0.9999, 0.3], dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, True, False])
    out = arc_margin_logits(cos, mask, m)
    expected = [margin_ref(c, m) for c in cos[:5].tolist()] + [0.3]
    assert out.tolist() == pytest.approx(expected, abs=1e-12)
    # the two branches really are the two formulas
    assert out[0].item() == pytest.approx(math.cos(math.acos(0.9) + m), abs=1e-12)
    assert out[3].item() == pytest.approx(thr - 1e-3 - m * math.sin(math.pi - m), abs=1e-12)


def test_arc_margin_logits_finite_grad_at_extremes() -> None:
    cos = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, False])
    out = arc_margin_logits(cos, mask, M)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(cos.grad).all()


def _fixed_arc(m: float = M, s: float = S) -> ArcMarginLoss:
    loss = ArcMarginLoss(embed_dim=2, num_classes=2, scale=s, margin=m).double()
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # normalised inside -> e_x, e_y
    return loss


def test_arc_margin_zero_margin_is_plain_ce() -> None:
    torch.manual_seed(0)
    loss = ArcMarginLoss(embed_dim=16, num_classes=7, scale=S, margin=0.0)
    x = torch.randn(12, 16)
    y = torch.randint(0, 7, (12,))
    cos = F.normalize(x, dim=-1) @ F.normalize(loss.proxies, dim=-1).t()
    torch.testing.assert_close(loss(x, y), F.cross_entropy(S * cos, y), rtol=1e-6, atol=0.0)  # fused: summation order differs


@pytest.mark.parametrize(
    "theta,m",
    [(0.4, 0.1), (1.2, 0.1), (3.1, 0.1), (2.0, 0.5), (2.8, 0.5)],  # 3.1 / 2.8: below cos(pi - m)
)
def test_arc_margin_target_logit_hand_computed(theta: float, m: float) -> None:
    loss = _fixed_arc(m)
    c0 = math.cos(theta)  # cosine to proxy 0 (the target)
    c1 = math.cos(math.pi / 2 - theta)  # cosine to proxy 1
    if theta in (3.1, 2.8):
        assert c0 < math.cos(math.pi - m)
        target = c0 - m * math.sin(math.pi - m)
    else:
        assert c0 > math.cos(math.pi - m)
        target = math.cos(theta + m)
    expected = -log_softmax_ref([S * target, S * c1])[0]
    got = loss(vecs(theta) * 5.0, torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_arc_margin_finite_grad_when_embedding_is_plus_minus_proxy(sign: float) -> None:
    loss = ArcMarginLoss(embed_dim=8, num_classes=3)
    x = (sign * loss.proxies.detach()[[0, 1, 2]] * 3.0).clone().requires_grad_(True)
    out = loss(x, torch.tensor([0, 1, 2]))
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


def test_arc_margin_proxies_xavier_uniform() -> None:
    torch.manual_seed(0)
    c, d = 50, 30
    loss = ArcMarginLoss(embed_dim=d, num_classes=c)
    bound = math.sqrt(6.0 / (c + d))
    assert loss.proxies.shape == (c, d) and loss.proxies.requires_grad
    assert loss.proxies.abs().max().item() <= bound
    assert loss.proxies.abs().max().item() > 0.9 * bound  # actually spans the range
    assert abs(loss.proxies.mean().item()) < 0.05 * bound


def test_arc_margin_loss_decreases_towards_own_proxy() -> None:
    torch.manual_seed(1)
    loss = ArcMarginLoss(embed_dim=32, num_classes=10).double()
    y = torch.arange(10)
    start = torch.randn(10, 32, dtype=torch.float64)
    goal = F.normalize(loss.proxies.detach(), dim=-1) * start.norm(dim=-1, keepdim=True)
    vals = [loss((1 - t) * start + t * goal, y).item() for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in zip(vals, vals[1:])), vals


def reference_arc_margin_loss(embeddings: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor,
                              scale: float, margin: float) -> torch.Tensor:
    """The ArcMarginLoss.forward this project had before the lean step (dense [B, C] one-hot, margin on all entries)."""
    cosine = cosine_fp32(embeddings, proxies)
    target = F.one_hot(labels, num_classes=cosine.shape[1]).bool()
    return F.cross_entropy(scale * arc_margin_logits(cosine, target, margin), labels)


def _lean_and_reference(loss: ArcMarginLoss, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(loss, d/dx, d/dproxies) of the module and of the reference formulation on the same inputs."""
    results = []
    for run in ("lean", "reference"):
        xi = x.detach().clone().requires_grad_(True)
        proxies = loss.proxies if run == "lean" else loss.proxies.detach().clone().requires_grad_(True)
        proxies.grad = None
        value = loss(xi, y) if run == "lean" else reference_arc_margin_loss(xi, proxies, y, loss.scale, loss.margin)
        value.backward()
        results.append((value.detach(), xi.grad, proxies.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [0.1, 0.0, 1.4])  # 1.4: many targets below cos(π − m), the fallback branch
def test_lean_arc_margin_equals_the_reference_formulation(m: float, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    loss = ArcMarginLoss(embed_dim=24, num_classes=40, scale=S, margin=m).to(dtype)
    x = torch.randn(32, 24, dtype=dtype)
    y = torch.randint(0, 40, (32,))
    if dtype == torch.float64:  # on the target proxy: cos = 1, sin² floored, clamp edge (ill-conditioned:
        x[:3] = loss.proxies.detach()[[5, 6, 7]] * 2.0  # φ' ~ 10³ amplifies fp32 rounding, so fp64 only)
        y[:3] = torch.tensor([5, 6, 7])
    if m == 1.4:
        target_cos = (F.normalize(x, dim=-1) * F.normalize(loss.proxies.detach(), dim=-1)[y]).sum(-1)
        assert (target_cos < math.cos(math.pi - m)).sum() >= 3
    lean, ref = _lean_and_reference(loss, x, y)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert lean[0].dtype == ref[0].dtype == dtype
    for got, want in zip(lean, ref):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_lean_arc_margin_ignores_autocast_and_takes_labels_in_any_order() -> None:
    torch.manual_seed(4)
    loss = ArcMarginLoss(embed_dim=16, num_classes=9)
    x, y = torch.randn(12, 16), torch.randint(0, 9, (12,))
    plain = loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(x, y)
    assert autocast.dtype == torch.float32 and autocast.item() == pytest.approx(plain.item(), rel=1e-6)
    order = torch.randperm(12)
    assert loss(x[order], y[order]).item() == pytest.approx(plain.item(), rel=1e-6)  # a mean over rows
    other = loss(x, (y + 1) % 9)
    assert abs(other.item() - plain.item()) > 1e-3  # the labels matter


def test_bf16_proxy_matmul_is_close_to_fp32_and_keeps_fp32_master_weights() -> None:
    torch.manual_seed(5)
    fp32 = ArcMarginLoss(embed_dim=64, num_classes=200)
    bf16 = ArcMarginLoss(embed_dim=64, num_classes=200, proxy_dtype="bf16")
    bf16.load_state_dict(fp32.state_dict())
    x, y = torch.randn(48, 64), torch.randint(0, 200, (48,))
    (a, ax, ap), (b, bx, bp) = (_lean_and_reference(module, x, y)[0] for module in (fp32, bf16))
    assert bf16.proxies.dtype == bp.dtype == torch.float32  # master weights and their gradient stay fp32
    assert b.item() == pytest.approx(a.item(), rel=2e-3) and b.item() != a.item()  # bf16 products, fp32 softmax
    for got, want in ((bx, ax), (bp, ap)):
        assert (got - want).norm() / want.norm() < 3e-2


def test_sharded_proxies_outside_torchrun_are_the_whole_matrix() -> None:
    torch.manual_seed(6)
    replicated = ArcMarginLoss(embed_dim=8, num_classes=5)
    torch.manual_seed(6)
    sharded = ArcMarginLoss(embed_dim=8, num_classes=5, sharding="sharded")
    assert torch.equal(sharded.proxies, replicated.proxies)
    x, y = torch.randn(4, 8), torch.tensor([0, 4, 2, 2])
    assert sharded(x, y).item() == replicated(x, y).item()


def test_arc_margin_options_are_checked() -> None:
    with pytest.raises(ValueError, match="proxy_dtype must be 'fp32' or 'bf16', got 'fp16'"):
        ArcMarginLoss(8, 3, proxy_dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proxy sharding must be 'replicated' or 'sharded', got 'split'"):
        ArcMarginLoss(8, 3, sharding="split")  # type: ignore[arg-type]


def test_proxy_memory_per_rank() -> None:
    assert proxy_memory_bytes(10**6, 512) == 16 * 10**6 * 512  # weights + gradient + two AdamW moments, fp32
    assert proxy_memory_bytes(10**6, 512, ranks=8) == proxy_memory_bytes(10**6, 512)  # replicated: every rank
    assert proxy_memory_bytes(10**6, 512, ranks=8, sharded=True) == 16 * 125_000 * 512
    assert proxy_memory_bytes(10, 4, ranks=3, sharded=True) == 16 * 4 * 4  # the largest shard: ceil(10 / 3) rows


# ---------------------------------------------------------------- MultiCaptionArcMarginLoss

IMG_ANGLES = (0.0, 0.6)
CAP_ANGLES = (0.3, -0.5, 0.4)  # captions 0, 1 belong to image 0; caption 2 to image 1
CAP_OWNER = (0, 0, 1)


def mc_authors_2d(img_angles: tuple[float, ...], cap_angles: tuple[float, ...], owner: tuple[int, ...], w: float) -> float:
    """The authors' MC loss for unit vectors in the plane, written out by hand."""
    total = 0.0
    for i, a in enumerate(img_angles):
        own = [o == i for o in owner]
        n = sum(own)
        t = [1.0 / n if o else 0.0 for o in own]
        z = [S * (margin_ref(math.cos(a - b), M) if o else math.cos(a - b)) for b, o in zip(cap_angles, own)]
        lp = log_softmax_ref(z)
        total += -sum(tk * lk for tk, lk in zip(t, lp)) + w * max(-(1.0 - tk) * lk for tk, lk in zip(t, lp))
    return total / len(img_angles)


def mc_hardest_2d(w: float) -> float:
    """The hardest-negative variant for the fixed batch above, plain math."""
    total = 0.0
    for i, a in enumerate(IMG_ANGLES):
        own = [o == i for o in CAP_OWNER]
        z = [S * (margin_ref(math.cos(a - b), M) if o else math.cos(a - b)) for b, o in zip(CAP_ANGLES, own)]
        lp = log_softmax_ref(z)
        n = sum(own)
        li = -sum(lp[k] / n for k in range(3) if own[k])
        li += w * max(-math.log(1.0 - math.exp(lp[k])) for k in range(3) if not own[k])
        total += li
    return total / len(IMG_ANGLES)


def mc_reference(images: torch.Tensor, captions: torch.Tensor, owner: list[int], w: float) -> float:
    """Independent reference of the authors' formula: python loops over float64 values.

    log p = log_softmax over the batch's captions of s·(margin on own captions); t_ik = 1/n_i;
    loss_i = Σ_k −t_ik log p_ik + w·max_k[−(1 − t_ik) log p_ik]; mean over all B images.
    """
    imgs = [[float(v) for v in row] for row in images.double()]
    caps = [[float(v) for v in row] for row in captions.double()]

    def normalised(v: list[float]) -> list[float]:
        length = math.sqrt(sum(x * x for x in v))
        return [x / length for x in v]

    imgs, caps = [normalised(v) for v in imgs], [normalised(v) for v in caps]
    total = 0.0
    for i, x in enumerate(imgs):
        n_i = sum(1 for o in owner if o == i)
        z, t = [], []
        for k, e in enumerate(caps):
            c = sum(a * b for a, b in zip(x, e))
            z.append(S * (margin_ref(c, M) if owner[k] == i else c))
            t.append(1.0 / n_i if owner[k] == i else 0.0)
        lp = log_softmax_ref(z)
        total += -sum(t[k] * lp[k] for k in range(len(caps))) + w * max(-(1 - t[k]) * lp[k] for k in range(len(caps)))
    return total / len(imgs)


@pytest.mark.parametrize("w", [0.0, 0.1])
def test_mc_authors_hand_computed(w: float) -> None:
    mc = MultiCaptionArcMarginLoss(scale=S, margin=M, max_negative_weight=w)
    got = mc(vecs(*IMG_ANGLES) * 2.0, vecs(*CAP_ANGLES) * 0.5, torch.tensor(CAP_OWNER))
    assert got.item() == pytest.approx(mc_authors_2d(IMG_ANGLES, CAP_ANGLES, CAP_OWNER, w), rel=1e-10)


def test_mc_authors_max_term_is_the_least_probable_caption_own_included() -> None:
    # image 0's least probable caption is its own caption 1 (angle -0.5 vs 0.4 for the negative):
    # the authors' term takes it with weight 1 - 1/2, where the hardest variant ignores own captions
    lp0 = log_softmax_ref([S * margin_ref(math.cos(0.3), M), S * margin_ref(math.cos(0.5), M), S * math.cos(0.4)])
    lp1 = log_softmax_ref([S * math.cos(0.3), S * math.cos(1.1), S * margin_ref(math.cos(0.2), M)])
    term0 = max(-0.5 * lp0[0], -0.5 * lp0[1], -lp0[2])
    term1 = max(-lp1[0], -lp1[1], 0.0 * lp1[2])
    on = MultiCaptionArcMarginLoss(max_negative_weight=0.1)(vecs(*IMG_ANGLES), vecs(*CAP_ANGLES), torch.tensor(CAP_OWNER))
    off = MultiCaptionArcMarginLoss(max_negative_weight=0.0)(vecs(*IMG_ANGLES), vecs(*CAP_ANGLES), torch.tensor(CAP_OWNER))
    assert on.item() - off.item() == pytest.approx(0.1 * (term0 + term1) / 2, rel=1e-10)
    assert term1 == -lp1[1]  # the negative at angle 1.1 from image 1


def test_mc_authors_captionless_row_counts_in_the_mean_with_its_max_term() -> None:
    angles = (IMG_ANGLES[0], 2.5, IMG_ANGLES[1])
    owner = (0, 0, 2)
    got = MultiCaptionArcMarginLoss()(vecs(*angles), vecs(*CAP_ANGLES), torch.tensor(owner))
    lp = log_softmax_ref([S * math.cos(2.5 - b) for b in CAP_ANGLES])  # no margin: row 1 owns nothing
    captioned = 2 * mc_authors_2d((IMG_ANGLES[0], IMG_ANGLES[1]), CAP_ANGLES, CAP_OWNER, 0.1)
    assert got.item() == pytest.approx((captioned + 0.1 * max(-v for v in lp)) / 3, rel=1e-10)
    assert got.item() == pytest.approx(mc_authors_2d(angles, CAP_ANGLES, owner, 0.1), rel=1e-10)


def test_mc_authors_matches_reference_with_captionless_row_three_captions_and_bf16() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(4, 16, generator=generator)
    captions = torch.randn(6, 16, generator=generator)
    owner = [0, 0, 0, 1, 3, 3]  # image 0 has 3 captions, image 2 none
    mc = MultiCaptionArcMarginLoss()
    assert mc(images.double(), captions.double(), torch.tensor(owner)).item() == pytest.approx(
        mc_reference(images, captions, owner, 0.1), rel=1e-10)
    assert mc(images, captions, torch.tensor(owner)).item() == pytest.approx(
        mc_reference(images, captions, owner, 0.1), rel=1e-5)
    img16, cap16 = images.bfloat16(), captions.bfloat16()
    got = mc(img16, cap16, torch.tensor(owner))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(mc_reference(img16, cap16, owner, 0.1), rel=1e-5)


def test_mc_authors_captionless_image_gets_a_gradient() -> None:
    images = vecs(IMG_ANGLES[0], 2.5, IMG_ANGLES[1]).requires_grad_(True)
    MultiCaptionArcMarginLoss()(images, vecs(*CAP_ANGLES), torch.tensor([0, 0, 2])).backward()
    assert images.grad[1].abs().sum().item() > 0
    images.grad = None
    MultiCaptionArcMarginLoss(max_negative="hardest")(images, vecs(*CAP_ANGLES), torch.tensor([0, 0, 2])).backward()
    assert images.grad[1].abs().sum().item() == 0.0  # the hardest variant skips captionless rows


def test_mc_rejects_unknown_max_negative() -> None:
    with pytest.raises(ValueError, match="max_negative"):
        MultiCaptionArcMarginLoss(max_negative="easiest")  # type: ignore[arg-type]


@pytest.mark.parametrize("w", [0.0, 0.1])
def test_mc_hardest_hand_computed(w: float) -> None:
    mc = MultiCaptionArcMarginLoss(scale=S, margin=M, max_negative_weight=w, max_negative="hardest")
    got = mc(vecs(*IMG_ANGLES) * 2.0, vecs(*CAP_ANGLES) * 0.5, torch.tensor(CAP_OWNER))
    assert got.item() == pytest.approx(mc_hardest_2d(w), rel=1e-10)


def test_mc_hardest_extra_term_pushes_hardest_negative_down() -> None:
    img = vecs(*IMG_ANGLES).requires_grad_(True)
    caps = vecs(*CAP_ANGLES)
    mc_on = MultiCaptionArcMarginLoss(max_negative_weight=0.1, max_negative="hardest")
    mc_off = MultiCaptionArcMarginLoss(max_negative_weight=0.0, max_negative="hardest")
    g_on = torch.autograd.grad(mc_on(img, caps, torch.tensor(CAP_OWNER)), img)[0]
    g_off = torch.autograd.grad(mc_off(img, caps, torch.tensor(CAP_OWNER)), img)[0]
    # descent direction of the extra term for image 0 reduces its similarity to its negative (caption 2)
    delta = -(g_on - g_off)[0]
    assert torch.dot(delta, caps[2]).item() < 0


def test_mc_hardest_image_without_captions_contributes_nothing() -> None:
    mc = MultiCaptionArcMarginLoss(max_negative="hardest")
    caps = vecs(*CAP_ANGLES)
    base = mc(vecs(*IMG_ANGLES), caps, torch.tensor(CAP_OWNER))
    with_empty = mc(vecs(IMG_ANGLES[0], 2.5, IMG_ANGLES[1]), caps, torch.tensor([0, 0, 2]))
    assert with_empty.item() == pytest.approx(base.item(), rel=1e-12)


def test_mc_hardest_single_captioned_image_has_no_negative_term() -> None:
    img, caps, owner = vecs(0.0, 1.0), vecs(0.3, -0.5), torch.tensor([0, 0])
    on = MultiCaptionArcMarginLoss(max_negative_weight=0.1, max_negative="hardest")(img, caps, owner)
    off = MultiCaptionArcMarginLoss(max_negative_weight=0.0, max_negative="hardest")(img, caps, owner)
    assert torch.isfinite(on) and on.item() == pytest.approx(off.item(), rel=1e-12)


@pytest.mark.parametrize("max_negative", ["authors", "hardest"])
def test_mc_all_empty_batch_is_zero_with_graph(max_negative: str) -> None:
    img = torch.randn(4, 8, requires_grad=True)
    caps = torch.randn(0, 8)
    out = MultiCaptionArcMarginLoss(max_negative=max_negative)(img, caps, torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and (img.grad == 0).all()


# ---------------------------------------------------------------- fp32 under autocast


def test_arc_margin_and_mc_are_fp32_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(5)
    arc = ArcMarginLoss(embed_dim=64, num_classes=40)
    embeddings = torch.randn(32, 64, generator=generator).bfloat16()
    labels = torch.randint(0, 40, (32,), generator=generator)
    captions = torch.randn(48, 64, generator=generator).bfloat16()
    owner = torch.randint(0, 32, (48,), generator=generator)
    mc = MultiCaptionArcMarginLoss()
    reference_arc = arc(embeddings.float(), labels)
    reference_mc = mc(embeddings.float(), captions.float(), owner)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_arc = arc(embeddings, labels)
        got_mc = mc(embeddings, captions, owner)
    assert got_arc.dtype == torch.float32 and got_mc.dtype == torch.float32
    assert got_arc.item() == pytest.approx(reference_arc.item(), abs=1e-5)
    assert got_mc.item() == pytest.approx(reference_mc.item(), abs=1e-5)


# ---------------------------------------------------------------- SymmetricInfoNCE


def infonce_ref(img_angles: tuple[float, ...], txt_angles: tuple[float, ...], scale: float) -> float:
    b = len(img_angles)
    z = [[scale * math.cos(a - t) for t in txt_angles] for a in img_angles]
    i2t = -sum(log_softmax_ref(z[i])[i] for i in range(b)) / b
    t2i = -sum(log_softmax_ref([z[r][j] for r in range(b)])[j] for j in range(b)) / b
    return 0.5 * (i2t + t2i)


IMG2, TXT2 = (0.0, 1.5), (0.2, 1.1)


def test_infonce_hand_computed_b2() -> None:
    loss = SymmetricInfoNCE().double()
    scale = loss.effective_scale().item()  # parameter was created in float32
    assert scale == pytest.approx(1 / 0.07, rel=1e-6)
    got = loss(vecs(*IMG2) * 3.0, vecs(*TXT2) * 0.7)
    assert got.item() == pytest.approx(infonce_ref(IMG2, TXT2, scale), rel=1e-10)


def test_infonce_logit_scale_clamped_in_place_not_in_forward() -> None:
    loss = SymmetricInfoNCE().double()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    # no clamp in the forward pass: the scale acts at 1000 and still receives a gradient
    got = loss(vecs(*IMG2), vecs(*TXT2))
    assert got.item() == pytest.approx(infonce_ref(IMG2, TXT2, 1000.0), rel=1e-10)
    got.backward()
    assert loss.logit_scale.grad.item() != 0.0
    loss.clamp_logit_scale_()
    assert loss.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-12)
    with torch.no_grad():
        loss.logit_scale.fill_(-0.5)
    loss.clamp_logit_scale_()  # the lower bound of open_clip's clamp: scale >= 1
    assert loss.logit_scale.item() == 0.0


def test_infonce_learnable_scale_param() -> None:
    loss = SymmetricInfoNCE(init_logit_scale=0.5)
    assert isinstance(loss.logit_scale, torch.nn.Parameter) and loss.logit_scale.item() == 0.5
    loss(torch.randn(4, 6), torch.randn(4, 6)).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.item() != 0.0


def test_infonce_symmetric() -> None:
    torch.manual_seed(0)
    loss = SymmetricInfoNCE().double()
    a, b = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    assert loss(a, b).item() == pytest.approx(loss(b, a).item(), rel=1e-12)
