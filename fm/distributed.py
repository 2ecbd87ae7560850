"""Data-parallel plumbing for FM training under torchrun (PyTorch DDP).

torchrun starts one process per worker and tells each who it is through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `context_from_env` reads them and
`join_process_group` joins the job (gloo for CPU training, NCCL for CUDA); without them, or with
one worker, both leave everything alone, so plain `python` runs as before.

Every rank walks the same global batches and takes its own contiguous slice of each one's
requests (`shard_bounds`). Two sums have to be global for K steps on W ranks to equal K steps
on one process:

* the loss: each task's BCE is a mean over that task's valid samples in the GLOBAL batch (a
  surface-specific task may have no valid row on one rank), so each rank contributes
  `local_sum * W / global_count`; DDP then averages gradients over ranks (divides by W);
* the progressive-validation NE: its (n, positives, log loss) sums are all-reduced.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fm.metrics import NEAccumulator

# what torchrun (torch.distributed.run) sets for every worker it starts
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job. world_size == 1: plain single-process training."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints progress and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def context_from_env(device: str | torch.device = "cpu") -> DistContext:
    """Who this process is, read from torchrun's environment; joins nothing yet.

    device: where training runs. For "cuda" without an index each rank takes cuda:LOCAL_RANK.
    Without torchrun's variables, or with WORLD_SIZE=1, this is the single-process context.
    Raises ValueError for a malformed environment (non-integer or inconsistent RANK /
    WORLD_SIZE / LOCAL_RANK).
    """
    dev = torch.device(device)
    if not all(v in os.environ for v in _TORCHRUN_VARS):
        return DistContext(device=dev)
    rank, world, local_rank = (_env_int(v) for v in _TORCHRUN_VARS)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local_rank}"
        )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return DistContext(rank=rank, world_size=world, device=dev)


def join_process_group(ctx: DistContext) -> None:
    """Join the job's process group (a no-op on one process); blocks until all ranks join.

    The backend follows the device: NCCL for CUDA, gloo otherwise; the rendezvous address
    comes from torchrun's MASTER_ADDR / MASTER_PORT. A group the caller already initialised
    is reused and must agree with `ctx` (else ValueError); one created here is destroyed when
    the process exits.
    """
    if not ctx.is_distributed:
        return
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    if not dist.is_initialized():
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://")
        atexit.register(_destroy)
    elif (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
        raise ValueError(
            f"the initialised process group is rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but the environment says rank {ctx.rank} of "
            f"{ctx.world_size}"
        )


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(lo: int, hi: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous slice [a, b) of the global batch's rows [lo, hi).

    Slices of ranks 0..W-1 are disjoint, in order, and cover [lo, hi); their sizes differ by at
    most one. A rank may get an empty slice when hi - lo < world_size.
    """
    n = hi - lo
    return lo + n * rank // world_size, lo + n * (rank + 1) // world_size


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """`module` under DistributedDataParallel when distributed, else `module` itself.

    Every parameter must take part in every step's loss (the FM's heads are always called,
    even on an empty slice), so DDP does not search the graph for unused ones. Buffers (the
    item-content matrix) are given data, equal on every rank: synced once at construction,
    not before every forward.
    """
    if not ctx.is_distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=False
    )


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum of `t` over all ranks (in place; returned for chaining). A no-op on one process."""
    if ctx.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_counts(
    outputs: dict[str, tuple[Tensor, Tensor]], ctx: DistContext
) -> dict[str, int]:
    """task -> number of valid samples in the whole global batch (all ranks).

    outputs: task -> (logits, labels), each flat [n_t] over this rank's valid samples.
    """
    tasks = list(outputs)
    local = torch.tensor([outputs[t][1].numel() for t in tasks], dtype=torch.int64)
    total = all_reduce_sum(local.to(ctx.device), ctx).cpu()
    return {t: int(c) for t, c in zip(tasks, total.tolist(), strict=True)}


def scaled_task_losses(
    outputs: dict[str, tuple[Tensor, Tensor]], counts: dict[str, int], world_size: int
) -> dict[str, Tensor]:
    """task -> this rank's share of the task's global mean BCE, times world_size.

    outputs: task -> (logits, labels) flat [n_t] over this rank's valid samples;
    counts: task -> valid samples over all ranks (`global_counts`).
    Each value is sum(BCE on this rank) * world_size / counts[task]. Averaging the gradients of
    these over the ranks, as DDP does, gives the gradient of the mean over all valid samples,
    whichever rank they sit on. A task with no valid sample anywhere gives a zero that keeps
    the graph. On one process this is the per-task mean of `FoundationModel.loss_from_outputs`.
    """
    losses: dict[str, Tensor] = {}
    for t, (logits, y) in outputs.items():
        n = counts[t]
        if n == 0:
            losses[t] = logits.sum() * 0.0
        else:
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            losses[t] = bce * (world_size / n)
    return losses


def all_reduce_ne(
    acc: dict[str, NEAccumulator], ctx: DistContext
) -> dict[str, NEAccumulator]:
    """task -> NE accumulator over every rank's samples (new objects when distributed).

    Sums (n, positives, log loss) in float64; on one process returns `acc` itself.
    """
    if not ctx.is_distributed:
        return acc
    tasks = list(acc)
    sums = torch.tensor([[acc[t].n, acc[t].pos, acc[t].ce] for t in tasks], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(ctx.device), ctx).cpu()
    return {t: NEAccumulator(*map(float, row)) for t, row in zip(tasks, sums.tolist(), strict=True)}
