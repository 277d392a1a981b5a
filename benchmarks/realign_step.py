"""Stage-2 (realignment) step cost: our RealignTask step vs a text-tower-only loop and open_clip's trainer.

    python benchmarks/realign_step.py                 # starter model, batch 256 (CPU)
    python benchmarks/realign_step.py --device cuda --batch 4096
    python benchmarks/realign_step.py --smoke

Ours: ``RealignTask.loss`` (tokenises the batch's captions, encodes them, symmetric InfoNCE
against the batch's *cached* image embeddings) + ``training._optimizer_step`` as ``fit`` runs it.
Reference 1 (target: ours <= 1.1x): plain torch on the same model and trainable tail (last
text block + final norm + projection), the same tokens pre-made, ``encode_text`` + the same
InfoNCE module + backward + AdamW. Reference 2: ``open_clip_train.train.train_one_epoch`` on a
one-batch loader (its step always runs the image tower too, since it has no embedding cache,
and puts the model in train mode); skipped when ``open_clip_train`` is not importable. It ships
inside the ``open_clip_torch`` wheel (3.3.0: top-level packages ``open_clip`` and
``open_clip_train``), so ``pip install open_clip_torch==3.3.0`` provides it; its optional
extras (wandb, tensorboard, webdataset) are not needed here.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

import _bench as B
import torch
import torch.nn.functional as F

from clipopt_core.models import towers
from clipopt_core.train.losses import SymmetricInfoNCE
from clipopt_core.train.tasks import RealignTask
from clipopt_core.train.config import REALIGN_TRAIN_DEFAULTS, RealignConfig

COLOURS = ("red", "green", "blue", "orange", "purple", "black", "white", "yellow")
THINGS = ("cat", "dog", "house", "car", "tree", "flower", "smiling face", "bicycle", "mountain", "boat")


def captions(count: int) -> list[str]:
    """Distinct captions of varied lengths (5-17 words)."""
    out = []
    for i in range(count):
        tail = " with a small detail" * (i % 4)
        out.append(f"a {COLOURS[i % 8]} {THINGS[(i // 8) % 10]} drawn in style {i // 80}{tail}, number {i}")
    return out


def realign_config(args) -> RealignConfig:
    return RealignConfig(train=dataclasses.replace(REALIGN_TRAIN_DEFAULTS, batch_size=args.batch, precision=args.precision))


def ours(args, texts, embeddings):
    bundle = B.load(args)
    config = realign_config(args)
    task = RealignTask(bundle, embeddings, texts, config, lambda b: 0.0)
    task.infonce.to(args.device)
    batch = next(iter(task.batches(config.train, 0, 0)))
    step = B.fit_stepper(task, config.train, args.device)
    return lambda: step(batch)


def tail_params(model) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    tail = towers.text_tail_parameters(model, 1)
    for p in tail:
        p.requires_grad_(True)
    return tail


def text_only(args, texts, embeddings):
    bundle = B.load(args)
    model = bundle.model.eval()
    tail = tail_params(model)
    loss_fn = SymmetricInfoNCE(float(model.logit_scale.detach().float().mean())).to(args.device)
    optimizer = torch.optim.AdamW([{"params": tail}, {"params": [loss_fn.logit_scale], "weight_decay": 0.0}],
                                  lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    tokens = bundle.tokenize(texts[: args.batch]).to(args.device)
    images = embeddings[: args.batch].to(args.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with B.autocast(args.device, args.precision):
            loss = loss_fn(images, model.encode_text(tokens))
        loss.backward()
        optimizer.step()

    return step


def open_clip_trainer(args, texts):
    """One ``train_one_epoch`` call on a one-batch loader = one open_clip training step."""
    from open_clip.loss import ClipLoss
    from open_clip_train.train import train_one_epoch

    bundle = B.load(args)
    model = bundle.model
    model.output_dict = True
    tail = tail_params(model)
    model.logit_scale.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": tail}, {"params": [model.logit_scale], "weight_decay": 0.0}],
                                  lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    size = bundle.image_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = bundle.tokenize(texts[: args.batch])

    class Loader(list):
        num_batches, num_samples = 1, args.batch

    class Data:
        dataloader = Loader([(images, tokens)])

        def set_epoch(self, epoch: int) -> None:
            pass

    cuda = args.device.startswith("cuda")
    oc_args = argparse.Namespace(
        device=args.device, precision=("amp_bf16" if args.precision == "bf16" else "fp32") if cuda else "fp32",
        distill=False, accum_freq=1, skip_scheduler=True, grad_clip_norm=1.0, horovod=False, rank=0, local_rank=0,
        world_size=1, log_every_n_steps=10**9, batch_size=args.batch, wandb=False)
    logging.getLogger().setLevel(logging.WARNING)
    data, loss = {"train": Data()}, ClipLoss()
    return lambda: train_one_epoch(model, data, loss, 0, optimizer, None, None, None, oc_args)


def main(argv: list[str] | None = None) -> int:
    ap = B.parser(__doc__)
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default 256; smoke 16)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="as TrainConfig (CUDA only)")
    args = B.finish_args(ap.parse_args(argv), warmup=2, repeats=5)
    args.batch = args.batch or (16 if args.smoke else 256)
    texts = captions(args.batch)
    dim = B.load(args).embed_dim
    embeddings = F.normalize(torch.randn(args.batch, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    B.header(args, batch=args.batch, precision=args.precision)

    seconds, rows = {}, []
    makers = {"ours (RealignTask + fit step)": lambda: ours(args, texts, embeddings),
              "text tower only (bare)": lambda: text_only(args, texts, embeddings)}
    try:
        import open_clip_train.train  # noqa: F401

        makers["open_clip_train step"] = lambda: open_clip_trainer(args, texts)
    except ImportError as exc:
        print(f"open_clip_train not installed: skipped ({exc}); it ships in the open_clip_torch wheel: "
              "pip install --force-reinstall --no-deps open_clip_torch==3.3.0")
    steps = {name: make() for name, make in makers.items()}
    for name, times in B.measure_interleaved(steps, warmup=args.warmup, repeats=args.repeats, device=args.device).items():
        seconds[name] = B.median(times)
        rows.append((name, seconds[name], B.spread(times), args.batch / seconds[name]))
    B.table(["step", "median_s", "min-max_s", "pairs/s"], rows)
    ours_s = seconds["ours (RealignTask + fit step)"]
    ratios = {"realign_vs_text_only": ours_s / seconds["text tower only (bare)"]}
    if "open_clip_train step" in seconds:
        ratios["realign_vs_open_clip_train"] = ours_s / seconds["open_clip_train step"]
    print("target: realign_vs_text_only <= 1.1")
    B.ratio_line(**ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
