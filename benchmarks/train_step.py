"""Stage-1 and MCIP training-step cost against a bare torch loop, and data-loader cost (cold and warm).

    python benchmarks/train_step.py                      # starter model, 112 px, batch 32 (CPU)
    python benchmarks/train_step.py --device cuda --batch 256 --image-size 224
    python benchmarks/train_step.py --smoke              # tiny model, seconds, no targets
    python benchmarks/train_step.py --images DIR         # a real image source instead of drawn shapes

Without data loading (pre-made tensors, same model, same batch): our step is
``RetrievalTask.loss`` + ``training.optimizer_step`` exactly as ``fit`` runs it (param groups,
cosine LR, autocast, clipping); the reference is a bare loop: ``encode_image`` + the same loss
module(s) + backward + AdamW (MCIP: caption rows and owners pre-built). Ratio = our seconds /
bare seconds (1.0 = no overhead).
What the bare loop leaves out: our param groups, per-step LR, clipping and loss bookkeeping (that
is what is measured); both leave out data loading.
With data loading: the real ``DataLoader`` of ``RetrievalTask.batches`` over image files
(train transform) for each ``--workers`` value, in seconds per image: loader alone and end to end
(loader + step), each in a *cold* first epoch (fresh dataset: every file read and decoded, loader
start-up included) and a *warm* next epoch, divided by the model-only seconds per image (the same
step on one of the loader's batches, timed before and after the end-to-end epochs). The model-only reference leaves out all
data work; that difference is the point. Target: end to end <= 1.1 x model-only.
Every ratio is ours / reference in seconds: lower is better. Medians of ``--repeats`` timed steps
after ``--warmup`` untimed ones. Never asserts timing.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _bench as B
import torch
from torch import nn

from clipopt_core.data.datasets import ImageDataset, train_transform
from clipopt_core.train.losses import ArcMarginLoss, MultiCaptionArcMarginLoss
from clipopt_core.train.tasks import RetrievalTask
from clipopt_core.train.config import RetrievalConfig, TrainConfig

LOADER_KEYS = ("loader_cold", "loader_warm", "e2e_cold", "e2e_warm", "model")  # seconds per image each


def synthetic(args, dim: int):
    """Pre-made batch + MCIP captions: images [B,3,S,S], labels, indices, caption table, ownership."""
    g = torch.Generator().manual_seed(0)
    size = args.image_size_resolved
    images = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    captions = nn.functional.normalize(torch.randn(args.caption_pool, dim, generator=g), dim=-1)
    counts = torch.randint(0, 21, (args.batch,), generator=g).tolist()  # 0-20 captions per image (docs/method.md#mining)
    captions_of = [torch.randint(0, args.caption_pool, (n,), generator=g).tolist() for n in counts]
    return images, labels, torch.arange(args.batch), captions, captions_of


def retrieval_config(args, mcip: bool, workers: int = 0) -> RetrievalConfig:
    train = TrainConfig(batch_size=args.batch, precision=args.precision)
    return RetrievalConfig(train=train, mc_weight=0.25 if mcip else 0.0, num_workers=workers)


def bare_step(args, bundle, dim: int, mcip: bool, data):
    """The reference: plain torch, no clipopt training code; same trainable set, modes and loss modules."""
    images, labels, _, captions, captions_of = data
    model, device = bundle.model, args.device
    bn = [m for m in model.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    frozen = {id(p) for m in bn for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tower = [p for p in model.visual.parameters() if id(p) not in frozen]
    for p in tower:
        p.requires_grad_(True)
    model.eval()
    model.visual.train()
    for m in bn:
        m.eval()
    arc = ArcMarginLoss(dim, args.classes).to(device)
    multi = MultiCaptionArcMarginLoss()
    optimizer = torch.optim.AdamW([{"params": tower, "lr": 1e-6}, {"params": list(arc.parameters()), "lr": 1e-4}],
                                  weight_decay=0.01)
    rows = torch.tensor([r for rs in captions_of for r in rs], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(captions_of)), torch.tensor([len(r) for r in captions_of]))
    caption_rows, owner, labels = captions[rows].to(device), owner.to(device), labels.to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with B.autocast(device, args.precision):
            features = model.encode_image(images)
            loss = arc(features, labels)
            if mcip:
                loss = 0.75 * loss + 0.25 * multi(features, caption_rows, owner)
        loss.backward()
        optimizer.step()

    return step


def ours_step(args, bundle, mcip: bool, data):
    images, labels, indices, captions, captions_of = data
    dataset = ImageDataset([""] * args.batch, labels.tolist(), transform=None)
    config = retrieval_config(args, mcip)
    task = RetrievalTask(bundle, dataset, args.classes, config, lambda b: 0.0,
                         captions if mcip else None, captions_of if mcip else None)
    task.arc.to(args.device)
    step = B.fit_stepper(task, config.train, args.device)
    return lambda: step((images, labels, indices))


def timed_epoch(task, config, epoch: int, step=None, device: str = "cpu") -> tuple[float, float, int, object]:
    """One epoch of ``task.batches`` (with ``step`` applied to each batch when given) →
    (first-batch s, whole-epoch s including loader start-up and the first batch, images, last batch)."""
    started, first, images, batch = time.perf_counter(), None, 0, None
    for batch in task.batches(config, epoch, 0):
        if step is not None:
            step(batch)
            B.sync(device)
        first = first if first is not None else time.perf_counter() - started
        images += len(batch[0])
    return first or 0.0, time.perf_counter() - started, images, batch


def loader_costs(args, bundle, uris, labels, workers: int) -> dict[str, float]:
    """Seconds per image of the real training ``DataLoader`` (``RetrievalTask.batches``, train transform)
    with ``workers`` workers, cold and warm, alone and end to end, plus the model-only step on one of its batches.

    *Cold*: a fresh ``ImageDataset`` (empty decode cache), so every image is read and decoded, and the
    loader (and its workers) start up: what the first epoch of a training run pays. *Warm*: the next
    epoch over the same dataset (with ``num_workers=0`` the decoded images are cached in the process;
    with workers the cache lives in worker processes that end with the epoch, so decoding recurs).
    The model is warmed up on a pre-made batch first, so that "cold" is about the data only.
    """
    transform = train_transform(bundle.image_size, bundle.mean, bundle.std, bundle.interpolation)
    config = retrieval_config(args, mcip=False, workers=workers)
    task = RetrievalTask(bundle, ImageDataset(uris, labels, transform), max(labels) + 1, config, lambda b: 0.0)
    task.arc.to(args.device)
    step = B.fit_stepper(task, config.train, args.device)
    g = torch.Generator().manual_seed(0)
    size = bundle.image_size
    premade = (torch.randn(args.batch, 3, size, size, generator=g), torch.as_tensor(labels[: args.batch]),
               torch.arange(args.batch))
    B.measure(lambda: step(premade), warmup=args.warmup, repeats=0, device=args.device)
    cost: dict[str, float] = {}
    first, seconds, count, _ = timed_epoch(task, config.train, 0)
    cost["first_batch_s"], cost["loader_cold"] = first, seconds / count
    _, seconds, count, batch = timed_epoch(task, config.train, 1)
    cost["loader_warm"] = seconds / count
    # model-only steps before and after the end-to-end epochs: drift of the shared machine shows in both
    repeats = max(1, count // args.batch)
    model = B.measure(lambda: step(batch), warmup=0, repeats=repeats, device=args.device)
    task.dataset = ImageDataset(uris, labels, transform)  # a fresh decode cache for the cold epoch
    _, seconds, count, _ = timed_epoch(task, config.train, 2, step, args.device)
    cost["e2e_cold"] = seconds / count
    _, seconds, count, _ = timed_epoch(task, config.train, 3, step, args.device)
    cost["e2e_warm"] = seconds / count
    model += B.measure(lambda: step(batch), warmup=0, repeats=repeats, device=args.device)
    cost["model"] = B.median(model) / args.batch
    return cost


def main(argv: list[str] | None = None) -> int:
    ap = B.parser(__doc__)
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 32; smoke 8)")
    ap.add_argument("--classes", type=int, default=100, help="ArcMargin proxies of the synthetic batch")
    ap.add_argument("--caption-pool", type=int, default=4096, help="MCIP caption rows to draw from")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="as TrainConfig (CUDA only)")
    ap.add_argument("--workers", default=None, help="comma-separated DataLoader num_workers (default 0,1,2; smoke 0,1)")
    ap.add_argument("--images", default=None, help="image source folder or manifest (default: drawn shapes in a temp dir)")
    args = B.finish_args(ap.parse_args(argv), warmup=2, repeats=5)
    args.batch = args.batch or (8 if args.smoke else 32)
    workers = [int(w) for w in (args.workers or ("0,1" if args.smoke else "0,1,2")).split(",")]

    bundle = B.load(args)
    args.image_size_resolved = bundle.image_size
    dim = bundle.embed_dim
    data = synthetic(args, dim)
    B.header(args, image_px=bundle.image_size, batch=args.batch, classes=args.classes, precision=args.precision, workers=workers)

    rows, seconds = [], {}
    for name, mcip in (("stage1", False), ("mcip", True)):
        pair = {"ours": ours_step(args, B.load(args), mcip, data), "bare": bare_step(args, B.load(args), dim, mcip, data)}
        for kind, times in B.measure_interleaved(pair, warmup=args.warmup, repeats=args.repeats, device=args.device).items():
            seconds[name, kind] = B.median(times)
            rows.append((f"{name} {kind}", seconds[name, kind], B.spread(times), args.batch / seconds[name, kind]))
    print("\n## step without data loading (pre-made tensors)")
    B.table(["step", "median_s", "min-max_s", "images/s"], rows)

    steps = args.warmup + args.repeats + 1
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            uris, labels = B.source_images(args.images)
        else:
            uris, labels = B.shapes_images(Path(tmp) / "shapes", steps * args.batch)
        uris, labels = uris[: steps * args.batch], labels[: steps * args.batch]
        if len(uris) < 3 * args.batch:
            raise SystemExit(f"{len(uris)} images: need at least 3 batches of {args.batch}")
        loader_rows, ratios = [], {}
        for w in workers:
            c = loader_costs(args, B.load(args), uris, labels, w)
            loader_rows.append((f"num_workers={w}", c["first_batch_s"], *(1e3 * c[k] for k in LOADER_KEYS),
                                *(c[k] / c["model"] for k in LOADER_KEYS[:-1])))
            for k in LOADER_KEYS[:-1]:
                ratios[f"{k}_vs_model_w{w}"] = c[k] / c["model"]
    print(f"\n## with data loading ({len(uris)} images from {args.images or 'drawn shapes'}; ms per image; "
          "ratios = ms per image / model-only ms per image, lower is better)")
    B.table(["loader", "first_batch_s", *(f"{k} ms" for k in LOADER_KEYS), *(f"{k}/model" for k in LOADER_KEYS[:-1])],
            loader_rows)
    print("targets (ours / reference seconds, lower is better): stage1/mcip vs bare ~1.0; e2e_warm and e2e_cold "
          "vs model <= 1.1")
    B.ratio_line(stage1_vs_bare=seconds["stage1", "ours"] / seconds["stage1", "bare"],
                 mcip_vs_bare=seconds["mcip", "ours"] / seconds["mcip", "bare"], **ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
