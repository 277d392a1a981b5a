"""Training scenarios run identically by one plain process and by every rank of a torchrun group.

    python tests/unit/_ddp_worker.py --data DIR --out DIR --scenarios stage1,realign
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/unit/_ddp_worker.py …

``DIR/rows.parquet`` holds the training images (``uri``, ``label``). Each scenario trains the tiny
model with global batch 8 in ``OUT/<scenario>/work`` and rank 0 writes ``events.json`` (every fit
event) and ``weights.safetensors`` (the task's modules after :func:`fit`, row-sharded proxies gathered whole).
A scenario's ``stage`` settings override the stage's config (``*_sharded``: ArcMargin proxies sharded by class).
Used by test_distributed.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import polars as pl
import torch
from safetensors.torch import save_file

from clipopt_core.runtime import distributed
from clipopt_core.data.datasets import ImageDataset, encode_labels, train_transform
from clipopt_core.models.loading import ModelSpec, load_model
from clipopt_core.train.tasks import RealignTask, RetrievalTask
from clipopt_core.train.config import RealignConfig, RetrievalConfig
from clipopt_core.train.loop import fit
from clipopt_core.train.config import TrainConfig
from clipopt_core.train.losses import ArcMarginLoss

BASE = dict(epochs=1, batch_size=8, lr=3e-3, lr_floor=1e-4, weight_decay=0.01, precision="fp32", max_steps=4,
            eval_every_steps=2, checkpoint_every_steps=2, validate_at_start=False, grad_clip=1.0)
SCENARIOS: dict[str, dict[str, Any]] = {
    "stage1": {"kind": "retrieval", "train": {}},
    "mcip": {"kind": "mcip", "train": {}},
    # the stage-2 AdamW of docs/method.md#realignment (eps 1e-6): the key bias of attention has an exactly-zero gradient, and
    # with eps 1e-8 Adam would blow its rounding noise (which differs with the batch split) up to ~lr per step
    "realign": {"kind": "realign", "train": {"epochs": 2, "max_steps": 5, "lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-6,
                                             "weight_decay": 0.2}},
    # constant LR (a floor above every group's base LR), so a 2-step run resumed to 4 steps equals a 4-step run
    "resume_prefix": {"kind": "retrieval", "train": {"lr_floor": 1.0, "max_steps": 2}},
    "resume": {"kind": "retrieval", "train": {"lr_floor": 1.0, "max_steps": 4}},
    "stage1_sharded": {"kind": "retrieval", "train": {}, "stage": {"proxy_sharding": "sharded"}},
    "mcip_sharded": {"kind": "mcip", "train": {}, "stage": {"proxy_sharding": "sharded"}},
    "resume_prefix_sharded": {"kind": "retrieval", "train": {"lr_floor": 1.0, "max_steps": 2},
                              "stage": {"proxy_sharding": "sharded"}},
}


def build_task(kind: str, rows: pl.DataFrame, cache: Path, stage: dict[str, Any] | None = None) -> Any:
    """A fresh task on the tiny model (same weights and data in every process).

    The ArcMargin proxies are drawn from the global RNG when the task is built, so it is seeded
    first: process start-up seeds it randomly (under torchrun rank 0's proxies would be broadcast).
    """
    torch.manual_seed(1234)
    bundle = load_model(ModelSpec("clipopt-tiny"), cache_dir=cache)
    counter = itertools.count()
    validate = lambda bundle: float(next(counter))  # noqa: E731 - every validation "improves": best = latest
    if kind == "realign":
        generator = torch.Generator().manual_seed(7)
        images = torch.nn.functional.normalize(torch.randn(21, bundle.embed_dim, generator=generator), dim=-1)
        captions = [f"a drawing of thing number {i}" for i in range(21)]  # 21 pairs: batches of 8, 8 and 5 (3 + 2 per rank)
        return RealignTask(bundle, images, captions, RealignConfig(), validate)
    ids, names = encode_labels(rows["label"].to_list())
    dataset = ImageDataset(rows["uri"].to_list(), ids,
                           train_transform(bundle.image_size, bundle.mean, bundle.std, bundle.interpolation))
    if kind == "retrieval":
        return RetrievalTask(bundle, dataset, len(names), RetrievalConfig(**(stage or {})), validate)
    generator = torch.Generator().manual_seed(11)
    captions = torch.randn(30, bundle.embed_dim, generator=generator)
    owned = [torch.randperm(30, generator=generator)[: int(torch.randint(0, 4, (1,), generator=generator))].tolist()
             for _ in range(len(rows))]
    return RetrievalTask(bundle, dataset, len(names), RetrievalConfig(mc_weight=0.25, **(stage or {})), validate,
                         captions, owned)


def run(scenario: str, data: Path, out: Path) -> None:
    """Train one scenario; rank 0 (or the plain process) writes events.json and weights.safetensors."""
    spec = SCENARIOS[scenario]
    rows = pl.read_parquet(data / "rows.parquet")
    task = build_task(spec["kind"], rows, data / "cache", spec.get("stage"))
    events: list[dict[str, float]] = []
    result = fit(task, TrainConfig(**{**BASE, **spec["train"]}), out / scenario / "work", log=events.append)
    weights = distributed.full_state_dict(task.modules)  # every rank joins the gather of sharded proxies
    if distributed.is_main():
        proxy_rows = task.arc.proxies.shape[0] if hasattr(task, "arc") else None  # rank 0's own rows
        (out / scenario / "events.json").write_text(json.dumps({"events": events, "steps": result.steps,
                                                                "world_size": distributed.world_size(),
                                                                "proxy_rows": proxy_rows}))
        save_file(weights, str(out / scenario / "weights.safetensors"))


def arc_loss(out: Path) -> None:
    """The sharded ArcMargin loss alone: 7 classes (4 + 3 rows on 2 ranks) on a fixed global batch of 6
    (3 rows per rank, targets in both shards). Rank 0 writes ``arc_loss/grads.safetensors``: the loss, the
    feature gradient over ranks divided by the rank count (what gradient averaging makes of it) and the
    gathered proxy gradient, which one process must reproduce."""
    torch.manual_seed(5)
    loss = ArcMarginLoss(16, 7, sharding="sharded")
    features = torch.randn(6, 16, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 6, 3, 4, 2, 5])
    local = distributed.local_rows(torch.arange(6))
    x = features[local].clone().requires_grad_(True)
    value = loss(x, labels[local])
    value.backward()
    grads = {"loss": value.detach().reshape(1), "features": distributed.gather_shard(x.grad) / distributed.world_size(),
             "proxies": distributed.gather_shard(loss.proxies.grad), "proxy_rows": torch.tensor([loss.proxies.shape[0]])}
    if distributed.is_main():
        (out / "arc_loss").mkdir(parents=True, exist_ok=True)
        save_file(grads, str(out / "arc_loss" / "grads.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.setup("cpu")
    for scenario in args.scenarios.split(","):
        arc_loss(args.out) if scenario == "arc_loss" else run(scenario, args.data, args.out)
    distributed.teardown()


if __name__ == "__main__":
    main()
