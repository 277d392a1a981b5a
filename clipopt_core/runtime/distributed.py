"""Data-parallel training under ``torchrun``: every helper is a no-op in a plain process.

How :func:`clipopt_core.train.loop.fit` and the stages use it when ``torch.distributed`` is
initialised (``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` joins the
group, gloo on CPU, nccl on CUDA):

* **Batches.** The *global* batch order is unchanged (the same seeded, class-balanced
  :class:`~clipopt_core.data.datasets.EpochBatches` permutation; augmentation is seeded per sample) and each
  rank takes a contiguous, disjoint slice of every global batch (:func:`shard_batches`,
  :func:`local_rows`). A step therefore means one *global* batch whatever the world size, and the
  checkpoint stores the global step: a run resumes on any number of ranks.
* **Gradients.** Instead of wrapping the model in ``DistributedDataParallel`` (the tasks call
  ``encode_image``/``encode_text``, not ``forward``, which DDP's hooks rely on), :func:`average_gradients`
  all-reduces the flattened gradients (25 MB buckets) once per optimizer step, after gradient
  accumulation and before unscaling/clipping, so every rank applies the same AdamW update.
* **Batch-wide losses.** Losses that compare a sample with the rest of the batch see the global
  batch: :func:`gather_rows` all-gathers embeddings *with gradient* (its backward sums the incoming
  gradients over ranks and keeps the local rows). Every rank then computes the same global loss;
  the sum in the backward and the mean in :func:`average_gradients` cancel, giving exactly the
  single-process gradient. InfoNCE (realign) and MCArcMargin (MCIP) use it; ArcMargin is per-sample
  (local mean, averaged over ranks = global mean; needs ``batch_size % world_size == 0``).
* **Side effects.** Only rank 0 writes checkpoints, the best file and exports, and logs. Every rank
  validates; rank 0's score is broadcast so best/early-stop decisions are identical everywhere.
  Resuming needs ``work_dir`` on a filesystem all ranks see (one node: always).
* **Normalisation and dropout.** Stage 1 keeps BatchNorm frozen (eval statistics, ``freeze_norm``),
  so per-rank batch statistics do not matter; LayerNorm is per-sample. Dropout masks are drawn per
  rank (statistically, not bitwise, the single-process run; the recipes use dropout 0).

ArcMargin proxies are replicated: ``C×D×4`` bytes of weights plus as much again for their gradient
and twice that for AdamW's two moments, i.e. ``16·C·D`` bytes per rank (1 M classes × 512 dims = 8.2 GB per rank). Past a few GiB they should be sharded by class across
ranks
(model-parallel softmax, "partial FC"): each rank keeps ``C/W`` proxies and their Adam state, the
features are gathered with :func:`gather_rows`, and the softmax denominator / target logit are
all-reduced. That would live in a ``ShardedArcMarginLoss`` next to :class:`~clipopt_core.train.losses.ArcMarginLoss`
with its proxies excluded from :func:`average_gradients`; it is not needed at the class counts here.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

T = TypeVar("T")
BUCKET_BYTES = 25 * 2**20
TIMEOUT_ENV = "CLIPOPT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


# -- group state ---------------------------------------------------------------------------------

def is_initialized() -> bool:
    """True inside a process group (under ``torchrun`` after :func:`setup`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or a plain process: the one that writes files and logs."""
    return rank() == 0


def is_follower() -> bool:
    """A rank other than 0 of an initialised group (it does not own the work folder)."""
    return is_initialized() and dist.get_rank() != 0


def _active() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(device: str = "cpu", *, timeout_s: float | None = None) -> str:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1; returns the device this rank uses.

    ``device`` ``cuda`` (or ``cuda:N``) becomes ``cuda:$LOCAL_RANK`` with the nccl backend; otherwise
    gloo on CPU (``$CLIPOPT_DIST_BACKEND`` overrides). The collective timeout is ``timeout_s``, else
    ``$CLIPOPT_DIST_TIMEOUT_S``, else 30 min; a stage passes its work-folder lock wait + 10 min, since the
    other ranks wait in the first collective while rank 0 waits for the lock. Outside ``torchrun`` this
    does nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if is_initialized():
        return device
    backend = os.environ.get("CLIPOPT_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    seconds = float(timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    atexit.register(teardown)
    return device


def teardown() -> None:
    """Leave the process group (idempotent)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _active():
        dist.barrier()


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args)`` on rank 0 only, then a barrier; other ranks get ``None``."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def main_only(log: Callable[[dict[str, float]], None]) -> Callable[[dict[str, float]], None]:
    """``log`` on rank 0, a no-op elsewhere."""
    return log if is_main() else (lambda event: None)


# -- parameters and gradients --------------------------------------------------------------------

def broadcast_modules(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does at construction)."""
    if not _active():
        return
    device = _comm_device()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            staged = tensor.detach().to(device).contiguous()
            dist.broadcast(staged, src=0)
            tensor.copy_(staged)


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_kind.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in group:
            bucket.append(tensor)
            size += tensor.numel() * tensor.element_size()
            if size >= limit:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


def average_gradients(params: Sequence[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every ``p.grad`` by its mean over ranks (a missing grad counts as zeros if any rank has one)."""
    if not _active():
        return
    device = _comm_device()
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    grads = []
    for parameter, flag in zip(params, present.tolist()):
        if flag:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
    scale = 1.0 / dist.get_world_size()
    for bucket in _buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors(bucket).to(device)
        dist.all_reduce(flat)
        flat.mul_(scale)
        for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(synced)


def average_stats(stats: dict[str, float]) -> dict[str, float]:
    """Mean of each logged scalar over ranks (same keys on every rank)."""
    if not _active():
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {**stats, **dict(zip(keys, values.tolist()))}


def broadcast_float(value: float) -> float:
    """Rank 0's ``value`` on every rank."""
    if not _active():
        return value
    staged = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.broadcast(staged, src=0)
    return float(staged.item())


# -- batches -------------------------------------------------------------------------------------

@dataclass
class ShardedBatches:
    """This rank's contiguous slice of every global batch of ``batches`` (a batch sampler)."""

    batches: Any
    rank: int
    world_size: int

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.batches:
            size = len(batch) // self.world_size
            yield batch[self.rank * size:(self.rank + 1) * size]


def shard_batches(batches: Any) -> Any:
    """``batches`` (e.g. :class:`EpochBatches`, fixed-size global batches) sharded over ranks; itself when alone."""
    if not _active():
        return batches
    size = getattr(batches, "batch_size", None)
    if size is not None and size % dist.get_world_size():
        raise ValueError(f"batch_size {size} (global) must be divisible by the {dist.get_world_size()} ranks")
    return ShardedBatches(batches, dist.get_rank(), dist.get_world_size())


def local_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a global batch ``rows [B]`` (near-even split; may be empty if B < W)."""
    if not _active():
        return rows
    return torch.tensor_split(rows, dist.get_world_size())[dist.get_rank()]


# -- gathering with gradient ---------------------------------------------------------------------

def _all_sizes(count: int) -> list[int]:
    sizes = torch.zeros(dist.get_world_size(), dtype=torch.long, device=_comm_device())
    sizes[dist.get_rank()] = count
    dist.all_reduce(sizes)
    return sizes.tolist()


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts); backward: sum over ranks, keep own rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        sizes = _all_sizes(x.shape[0])
        device = _comm_device()
        padded = x.new_zeros((max(sizes), *x.shape[1:]), device=device)
        padded[:x.shape[0]] = x.detach().to(device)
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded)
        ctx.sizes, ctx.rank, ctx.device = sizes, dist.get_rank(), x.device
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]).to(x.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.detach().to(_comm_device()).contiguous().clone()
        dist.all_reduce(total)
        start = sum(ctx.sizes[:ctx.rank])
        return total[start:start + ctx.sizes[ctx.rank]].to(ctx.device)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [n_r, ...]`` of every rank → ``[Σ n_r, ...]`` in rank order, differentiable w.r.t. the local rows."""
    if not _active():
        return x
    return _GatherRows.apply(x)


def gather_pairs(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local InfoNCE pairs ``[n_r, D]`` × 2 → the global batch ``[B, D]`` × 2 (pair i ↔ i kept)."""
    return gather_rows(image_embeddings), gather_rows(text_embeddings)


def gather_captioned(features: torch.Tensor, captions: torch.Tensor,
                     owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MCArcMargin inputs of the global batch: features ``[B, D]``, captions ``[N, D]``, owner ``[N]``.

    ``owner`` indexes the local batch; it is shifted by the rows of the ranks before this one.
    """
    if not _active():
        return features, captions, owner
    sizes = _all_sizes(features.shape[0])
    shifted = owner + sum(sizes[:dist.get_rank()])
    return gather_rows(features), gather_rows(captions), gather_rows(shifted)
