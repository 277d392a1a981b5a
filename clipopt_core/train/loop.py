"""The one training loop every stage uses.

A stage supplies a :class:`TrainTask` (what trains, the loss, the batches, validation);
:func:`fit` supplies the rest: AdamW with parameter groups, per-step cosine decay to a
floor (no warm-up), mixed precision, gradient clipping per group (:func:`clip_gradients`;
docs/method.md#clipping), gradient accumulation, periodic validation with best-weights keeping
and early stopping, and checkpoints every N steps that :func:`fit` resumes from with
bit-identical results.
"""
from __future__ import annotations

import ast
import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipopt_core.runtime import distributed
from clipopt_core.train.config import TrainConfig
from clipopt_core.runtime.locks import work_dir_lock

LAST_DIR = "last"
BEST_FILE = "best.safetensors"


class TrainTask(Protocol):
    """What a stage provides to :func:`fit`.

    Optional: ``after_step()``, called after every optimizer step (e.g. to clamp a parameter in
    place); a ``"clip_group"`` key in a parameter group puts the groups sharing it under one
    clipping norm (default: each group is clipped on its own).
    """

    modules: nn.ModuleDict  # everything saved in checkpoints (model, loss proxies, logit scale)

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]: ...
    def steps_per_epoch(self, config: TrainConfig) -> int: ...
    def batches(self, config: TrainConfig, epoch: int, start_step: int) -> Iterable[Any]: ...
    def train_mode(self) -> None: ...
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def validate(self) -> float: ...  # higher is better


@dataclass
class FitResult:
    best_score: float
    best_step: int
    steps: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_lr(base: float, floor: float, step: int, total: int) -> float:
    """Learning rate at optimizer ``step`` of ``total``: cosine from ``base`` down to ``min(floor, base)``."""
    floor = min(floor, base)
    progress = min(step / max(total, 1), 1.0)
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(task: TrainTask, config: TrainConfig, work_dir: Path, *, device: torch.device | str = "cpu",
        log: Callable[[dict[str, float]], None] = lambda event: None,
        lock_timeout_s: float | None = None) -> FitResult:
    """Train ``task`` under ``config``, resuming from ``work_dir/last`` when present.

    On return the task's modules hold the best validated weights (or the last ones if
    validation never ran). ``log`` receives one dict per optimizer step and per validation.
    The run holds ``work_dir/.lock`` (:func:`clipopt_core.runtime.locks.work_dir_lock`): a second run
    on the same folder waits up to ``lock_timeout_s`` (default ``$CLIPOPT_LOCK_TIMEOUT_S``, 1 h)
    and then resumes from the first one's checkpoint, or fails with ``WorkDirLocked``.
    Under ``torchrun`` each rank trains a slice of every global batch (:mod:`clipopt_core.runtime.distributed`).
    """
    with work_dir_lock(work_dir, timeout_s=lock_timeout_s):
        distributed.run_on_main(_recover_interrupted_save, work_dir)  # under torchrun only rank 0 touches files
        return _fit(task, config, work_dir, device=device, log=log)


def _recover_interrupted_save(work_dir: Path) -> None:
    """Undo what a kill in the middle of :func:`_save_checkpoint` / :func:`_atomic_save` left behind.

    A kill between the two renames of the checkpoint swap leaves no ``last`` but a complete
    ``last.old-*``: that one is restored (else the run would silently start over). Staging
    leftovers (``*.tmp-*``, possibly half-written) and superseded ``last.old-*`` are removed.
    """
    last = work_dir / LAST_DIR
    olds = sorted(work_dir.glob(f"{LAST_DIR}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not (last / "state.json").exists():
        for old in olds:
            if (old / "state.json").exists():
                if last.exists():
                    shutil.rmtree(last)
                os.replace(old, last)
                break
    for leftover in [*work_dir.glob(f"{LAST_DIR}.old-*"), *work_dir.glob("*.tmp-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def _fit(task: TrainTask, config: TrainConfig, work_dir: Path, *, device: torch.device | str,
         log: Callable[[dict[str, float]], None]) -> FitResult:
    """:func:`fit` without the lock (the caller holds it)."""
    started = time.perf_counter()
    log = distributed.main_only(log)
    device = torch.device(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    optimizer = torch.optim.AdamW(task.param_groups(config), betas=config.betas, eps=config.eps)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    autocast_dtype = autocast_dtype_for(config.precision, device)
    _check_clipping(config)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    steps_per_epoch = task.steps_per_epoch(config) // config.accumulation_steps
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or 10**18)
    state = _State()
    distributed.broadcast_modules(task.modules)  # every rank starts from rank 0's weights
    if (work_dir / LAST_DIR / "state.json").exists():
        state = _load_checkpoint(work_dir / LAST_DIR, task, optimizer, scaler)
    elif config.validate_at_start and total_steps > 0:
        _validate(task, state, config, work_dir, log)  # the starting weights compete for "best" too
    after_step = getattr(task, "after_step", lambda: None)
    while state.step < total_steps and not state.stopped_early:
        epoch, step_in_epoch = divmod(state.step, steps_per_epoch)
        task.train_mode()
        micro: list[Any] = []
        for batch in task.batches(config, epoch, step_in_epoch * config.accumulation_steps):
            micro.append(batch)
            if len(micro) < config.accumulation_steps:
                continue
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(group["base_lr"], config.lr_floor, state.step, total_steps)
            stats = optimizer_step(task, micro, optimizer, scaler, config, autocast_dtype)
            after_step()
            micro = []
            state.step += 1
            log({"step": state.step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **stats})
            end_of_epoch = state.step % steps_per_epoch == 0
            if state.step % config.eval_every_steps == 0 or end_of_epoch or state.step == total_steps:
                _validate(task, state, config, work_dir, log)
                task.train_mode()
            if state.step % config.checkpoint_every_steps == 0 or end_of_epoch:
                _save_checkpoint(work_dir / LAST_DIR, task, optimizer, scaler, state)
            if state.stopped_early or state.step >= total_steps or end_of_epoch:
                break
        else:
            raise RuntimeError(f"the task yielded fewer batches than its {steps_per_epoch} steps per epoch")
    _save_checkpoint(work_dir / LAST_DIR, task, optimizer, scaler, state)
    distributed.barrier()  # rank 0 has written the best file
    if (work_dir / BEST_FILE).exists():
        distributed.load_full_state_dict(task.modules, load_file(str(work_dir / BEST_FILE)))
    return FitResult(state.best_score, state.best_step, state.step, state.stopped_early, state.history,
                     time.perf_counter() - started)


@dataclass
class _State:
    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: reduced precision on CUDA only, else ``None``."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _check_clipping(config: TrainConfig) -> None:
    if config.clip_mode not in ("unscaled", "authors"):
        raise ValueError(f"clip_mode must be 'unscaled' or 'authors', got {config.clip_mode!r}")
    if config.grad_clip is not None and not config.grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0, or None for no clipping; got {config.grad_clip}")


def clip_groups(optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    """The optimizer's parameters in clipping sets: one per parameter group, or per shared ``clip_group`` key."""
    sets: dict[Any, list[nn.Parameter]] = {}
    for index, group in enumerate(optimizer.param_groups):
        sets.setdefault(group.get("clip_group", index), []).extend(group["params"])
    return list(sets.values())


def clip_gradients(groups: list[list[nn.Parameter]], max_norm: float | None, scale: float = 1.0) -> float:
    """Clip each group's gradients to L2 norm ≤ ``max_norm`` on its own; return the total true norm.

    ``scale`` is the factor the gradients currently carry (a GradScaler's scale when they were not
    unscaled, else 1): ``max_norm`` applies to the gradients as they are (the authors' fp16 form
    clips scaled gradients), while the returned norm over all groups is divided by ``scale``.
    ``max_norm`` ``None`` clips nothing. Parameters without a gradient are skipped.
    """
    squares = 0.0
    for params in groups:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            continue
        norm = distributed.grad_norm(with_grad)  # row-sharded proxies: their rows summed over ranks
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
        squares += float(norm) ** 2
    return math.sqrt(squares) / scale


def unscale_and_clip(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float | None,
                     mode: str) -> float:
    """Clip the gradients per clip group before ``scaler.step``; return the true total norm.

    ``unscaled``: ``scaler.unscale_`` first, so ``max_norm`` bounds the true gradients. ``authors``:
    clip the gradients still multiplied by the scaler's scale (``scaler.step`` unscales later), so
    the effective bound is ``max_norm / scale``. Identical when the scaler is disabled.
    """
    if mode == "unscaled":
        scaler.unscale_(optimizer)
    scale = float(scaler.get_scale()) if scaler.is_enabled() and mode == "authors" else 1.0
    return clip_gradients(clip_groups(optimizer), max_norm, scale)


def optimizer_step(task: TrainTask, micro: list[Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   config: TrainConfig, autocast_dtype: torch.dtype | None) -> dict[str, float]:
    """One optimizer step over the micro-batches ``micro`` as :func:`fit` takes it (benchmarks time this)."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for batch in micro:
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, stats = task.loss(batch)
        scaler.scale(loss / len(micro)).backward()
        for key, value in {"loss": float(loss.detach()), **stats}.items():
            totals[key] = totals.get(key, 0.0) + value / len(micro)
    distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]])  # no-op outside torchrun
    totals = distributed.average_stats(totals)
    totals["grad_norm"] = unscale_and_clip(optimizer, scaler, config.grad_clip, config.clip_mode)
    scaler.step(optimizer)
    scaler.update()
    return totals


def _validate(task: TrainTask, state: _State, config: TrainConfig, work_dir: Path, log: Callable) -> None:
    with torch.no_grad():
        score = distributed.broadcast_float(float(task.validate()))  # rank 0's score decides everywhere
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_step, state.evals_without_improvement = score, state.step, 0
        _atomic_save(distributed.full_state_dict(task.modules), work_dir / BEST_FILE)
    else:
        state.evals_without_improvement += 1
        state.stopped_early = state.evals_without_improvement >= config.patience
    event = {"step": state.step, "val_score": score, "best_score": state.best_score}
    state.history.append(event)
    log(event)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    if not distributed.is_main():
        return
    temp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    save_file(tensors, str(temp))
    os.replace(temp, path)


def _save_checkpoint(folder: Path, task: TrainTask, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, state: _State) -> None:
    """Write model, optimizer, scaler and RNG state to a temp folder, then swap it in (rank 0 writes;
    every rank joins in gathering row-sharded parameters and their optimizer state whole)."""
    modules, per_param = distributed.full_state_dict(task.modules), distributed.full_optimizer_state(optimizer)
    if not distributed.is_main():
        return
    staging = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    save_file(modules, str(staging / "modules.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, entries in per_param.items() for name, value in entries.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(staging / "optimizer.safetensors"))
    groups = [{k: v for k, v in group.items() if k != "params"} for group in opt_state["param_groups"]]
    numpy_state = np.random.get_state()
    meta = {
        "state": asdict(state), "param_groups": groups, "scaler": scaler.state_dict(),
        "rng_python": repr(random.getstate()),
        "rng_numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (staging / "state.json").write_text(json.dumps(meta))
    previous = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex}")
    if folder.exists():
        os.replace(folder, previous)
    os.replace(staging, folder)
    if previous.exists():
        shutil.rmtree(previous)


def _load_checkpoint(folder: Path, task: TrainTask, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> _State:
    """Restore everything :func:`_save_checkpoint` wrote; returns the loop state."""
    meta = json.loads((folder / "state.json").read_text())
    distributed.load_full_state_dict(task.modules, load_file(str(folder / "modules.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    groups = [{**saved, "params": current["params"]} for saved, current in zip(meta["param_groups"], optimizer.state_dict()["param_groups"])]
    optimizer.load_state_dict({"state": distributed.shard_optimizer_state(optimizer, per_param), "param_groups": groups})
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group["base_lr"] = saved["base_lr"]
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    random.setstate(ast.literal_eval(meta["rng_python"]))
    kind, keys, *rest = meta["rng_numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return _State(**meta["state"])
