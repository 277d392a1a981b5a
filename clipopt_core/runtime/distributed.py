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

* **Row-sharded parameters** (ArcMargin's ``proxy_sharding="sharded"``; docs/scaling.md): a parameter
  marked by :func:`mark_row_sharded` holds only this rank's rows (:func:`row_range`) and its AdamW state
  the same rows. It is left out of :func:`broadcast_modules` and :func:`average_gradients` (its gradient
  is already the global one), its rows count once in the clipping norm (:func:`grad_norm`), and
  checkpoints hold the full tensor (:func:`full_state_dict`, :func:`full_optimizer_state`; loaded back
  with :func:`load_full_state_dict`, :func:`shard_optimizer_state`), so a checkpoint is the same
  whichever mode or rank count wrote it.
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

def broadcast_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's (same shape everywhere); returns it."""
    if _active():
        with torch.no_grad():
            staged = tensor.detach().to(_comm_device()).contiguous()
            dist.broadcast(staged, src=0)
            tensor.copy_(staged)
    return tensor


def broadcast_modules(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does at construction); row-sharded
    parameters keep their own rows."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if not is_row_sharded(tensor):
            broadcast_tensor_(tensor)


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
    """Replace every ``p.grad`` by its mean over ranks (a missing grad counts as zeros if any rank has one);
    row-sharded parameters are skipped."""
    if not _active():
        return
    device = _comm_device()
    params = [p for p in params if not is_row_sharded(p)]  # their gradient is already the global one
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


# -- row-sharded parameters (ArcMargin proxies sharded by class) ---------------------------------

_ROW_SHARDED = "clipopt_row_sharded"


def mark_row_sharded(parameter: nn.Parameter) -> None:
    """Declare that ``parameter`` holds this rank's rows (:func:`row_range`) of a larger tensor."""
    setattr(parameter, _ROW_SHARDED, True)


def is_row_sharded(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, _ROW_SHARDED, False))


def row_range(total: int, at: tuple[int, int] | None = None) -> tuple[int, int]:
    """``[start, stop)``: the rows of ``total`` that rank ``r`` of ``w`` holds (``at=(r, w)``, default this
    rank of the group), split near-evenly in rank order as ``torch.tensor_split`` does."""
    r, w = at if at is not None else (rank(), world_size())
    size, extra = divmod(total, w)
    start = r * size + min(r, extra)
    return start, start + size + int(r < extra)


def row_shard(full: torch.Tensor) -> torch.Tensor:
    """A copy of this rank's rows of ``full [R, ...]`` (:func:`row_range`); ``full`` itself when alone."""
    if not _active():
        return full
    start, stop = row_range(full.shape[0])
    return full[start:stop].clone()


def gather_shard(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows ``[R_r, ...]`` → the full ``[Σ R_r, ...]`` on every rank (no gradient)."""
    with torch.no_grad():
        return gather_rows(local.detach())


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place ``sum`` or ``max`` over ranks (through the backend's device); returns ``tensor``."""
    if _active():
        staged = tensor.to(_comm_device())
        dist.all_reduce(staged, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        tensor.copy_(staged)
    return tensor


def grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` (all with a grad), the rows of row-sharded ones summed over ranks."""
    rows = [p.grad for p in params if is_row_sharded(p)]
    whole = torch.nn.utils.get_total_norm([p.grad for p in params if not is_row_sharded(p)])
    if not rows:
        return whole
    squares = all_reduce_(torch.nn.utils.get_total_norm(rows).double() ** 2)
    return (whole.double().to(squares.device) ** 2 + squares).sqrt().to(whole.dtype)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict on the CPU with row-sharded parameters gathered whole (a collective: every rank calls it)."""
    sharded = {name for name, p in module.named_parameters() if is_row_sharded(p)}
    return {name: (gather_shard(t) if name in sharded else t).detach().cpu().contiguous()
            for name, t in module.state_dict().items()}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`full_state_dict` (from any mode or rank count), keeping this rank's rows of row-sharded parameters."""
    sharded = {name for name, p in module.named_parameters() if is_row_sharded(p)}
    module.load_state_dict({name: row_shard(t) if name in sharded else t for name, t in state.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """``optimizer.state_dict()["state"]`` with the per-row state of row-sharded parameters gathered (a collective)."""
    params = _optimizer_params(optimizer)
    return {index: {name: gather_shard(value) if is_row_sharded(params[index]) and value.dim() else value
                    for name, value in entries.items()}
            for index, entries in optimizer.state_dict()["state"].items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer,
                          state: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse of :func:`full_optimizer_state`: this rank's rows of row-sharded parameters' state."""
    params = _optimizer_params(optimizer)
    return {index: {name: row_shard(value) if is_row_sharded(params[index]) and value.dim() else value
                    for name, value in entries.items()}
            for index, entries in state.items()}


def proxy_memory_bytes(num_classes: int, dim: int, ranks: int = 1, sharded: bool = False) -> int:
    """Bytes per rank of ArcMargin proxies trained by AdamW in fp32: weights, gradient, two moments (16 B/entry);
    sharded: this rank's ceil(C/W) rows only. The step's [B, C_l] logit buffer comes on top (docs/scaling.md)."""
    rows = -(-num_classes // ranks) if sharded else num_classes
    return 16 * rows * dim
