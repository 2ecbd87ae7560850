"""Streaming training: passes over time-ordered requests, checkpoints along the way.

Each batch is scored before the model learns from it (progressive validation), so the NE of the
first pass is an honest out-of-sample number, as in online streaming training. With
`config.epochs` > 1 (small data) the window is read again in the same order; a later pass's
progressive NE has seen the data before, so judge such a model on a later slice (`evaluate_fm`).
The learning rate follows `FMConfig.lr_at` (warm-up, then constant or decaying) over all steps.

Under torchrun the same function trains data-parallel (PyTorch DDP, `fm.distributed`): every
rank takes its slice of each global batch of `config.batch_requests` requests, the loss and
the NE are global sums, and only rank 0 prints and writes checkpoints. K steps on W processes
give the weights of K steps on one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from fm.batching import Batch, Requests
from fm.checkpoint import load_checkpoint, save_checkpoint
from fm.config import FMConfig
from fm.distributed import (
    DistContext,
    all_reduce_ne,
    context_from_env,
    global_counts,
    join_process_group,
    scaled_task_losses,
    shard_bounds,
    wrap_ddp,
)
from fm.history import UserHistories
from fm.metrics import NEAccumulator, base_rate_logit
from fm.model import FoundationModel

_CKPT = re.compile(r"step_(\d+)\.pt$")


@dataclass
class TrainResult:
    model: FoundationModel
    ne: dict[str, float]  # progressive-validation NE per FM task over the last pass
    steps: int
    seconds: float
    checkpoints: list[Path] = field(default_factory=list)  # written by this call
    # The progressive NE of every pass in order (the last one possibly partial); only the
    # first is out of sample.
    pass_ne: list[dict[str, float]] = field(default_factory=list)


def _utc(ts: Any) -> pd.Timestamp:
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The `step_*.pt` file with the highest step in the folder, if any."""
    found = [
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).glob("step_*.pt")
        if (m := _CKPT.search(p.name))
    ]
    return max(found)[1] if found else None


def _update_ne(acc: dict[str, NEAccumulator], outputs: dict[str, tuple[torch.Tensor, ...]]) -> None:
    for t, (logits, y) in outputs.items():
        acc[t].update(y.detach().cpu().numpy(), torch.sigmoid(logits).detach().cpu().numpy())


class _Scored(nn.Module):
    """model(batch) then its task heads, as one forward: what DDP wraps, so that the heads'
    parameters are inside the module whose gradients it averages."""

    def __init__(self, model: FoundationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        return self.model.task_outputs(batch, self.model(batch))


def start_heads_at_base_rates(model: FoundationModel, requests: Requests) -> None:
    """Set each task head's output bias to the log-odds of that task's positive rate over the
    training requests (main tasks over all their labelled rows, an aux task over its surface's),
    so that training starts from the base rate rather than p = 0.5: a rare task (KuaiRand's
    forward, ~0.1% positives) otherwise spends its first pass unlearning a large bias, and a
    small FM could end it worse than the base rate (NE > 1). The usual bias initialisation for
    imbalanced binary targets (Karpathy, "A Recipe for Training Neural Networks", 2019).
    Rates are clipped as `fm.metrics.base_rate_logit` does; a task with no labelled row keeps 0.
    The same on every rank (every rank holds all requests)."""
    cfg = model.config
    col = {t: i for i, t in enumerate(cfg.fm_tasks)}
    with torch.no_grad():
        if model.main_head is not None:
            for i, t in enumerate(cfg.main_tasks):
                if (b := base_rate_logit(requests.labels[:, col[t]])) is not None:
                    model.main_head.bias[i] = b
        for s, head in model.aux_heads.items():
            on_s = requests.surface == cfg.surfaces.index(s)
            for j, t in enumerate(cfg.aux_tasks[s]):
                if (b := base_rate_logit(requests.labels[on_s, col[t]])) is not None:
                    head.mlp[-1].bias[j] = b


def build_optimizer(model: FoundationModel, config: FMConfig) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices (`weight_decay`) and embedding tables
    (`embedding_decay`), none on biases and LayerNorm gains (nanoGPT's split)."""
    emb_decay = config.weight_decay if config.embedding_decay is None else config.embedding_decay
    if config.weight_decay == 0 and emb_decay == 0:  # one group: the layout of older checkpoints
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[Tensor]] = {"matrix": [], "table": [], "none": []}
    for p in model.parameters():
        kind = "table" if id(p) in tables else "matrix" if p.dim() >= 2 else "none"
        groups[kind].append(p)
    decay = {"matrix": config.weight_decay, "table": emb_decay, "none": 0.0}
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": decay[k]} for k, ps in groups.items() if ps],
        lr=config.lr,
    )


def _loss(
    model: FoundationModel, outputs: dict[str, tuple[Tensor, Tensor]], ctx: DistContext
) -> Tensor:
    """The weighted multi-task loss; on several ranks each task's mean is over the global batch."""
    if not ctx.is_distributed:
        return model.loss_from_outputs(outputs)[0]
    losses = scaled_task_losses(outputs, global_counts(outputs, ctx), ctx.world_size)
    return torch.stack([model.config.task_weight(t) * v for t, v in losses.items()]).sum()


def train_step(
    model: FoundationModel,
    opt: torch.optim.Optimizer,
    batch: Batch,
    acc: dict[str, NEAccumulator],
    *,
    lr: float,
    ctx: DistContext | None = None,
    scored: nn.Module | None = None,
) -> Tensor:
    """One progressive-validation step, shared by `train_streaming` and `fm.follow`: score
    `batch` into the NE accumulators `acc` (task -> NEAccumulator) BEFORE learning from it
    (with dropout, by the eval-mode model, as serving would), then one step of `opt` at
    learning rate `lr` on the weighted multi-task loss, gradients clipped to norm 1.

    batch: already on the model's device. ctx / scored: the data-parallel context and the
    DDP-wrapped `_Scored(model)` (default: one process, no wrapper). -> the loss, detached
    (a tensor: reading it would wait for the device)."""
    ctx = ctx or DistContext(device=batch.hist_item.device)
    outputs = (scored or _Scored(model))(batch)
    if model.config.dropout > 0:  # score with the eval-mode model, as serving would
        model.eval()
        with torch.no_grad():
            _update_ne(acc, model.task_outputs(batch, model(batch)))
        model.train()
    else:
        _update_ne(acc, outputs)
    loss = _loss(model, outputs, ctx)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP, gradients arrive averaged over the ranks
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def train_streaming(
    events: pd.DataFrame,
    config: FMConfig,
    *,
    end: pd.Timestamp | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 200,
    max_steps: int | None = None,
    progress: bool = True,
    item_content: Any = None,
    model_factory: Callable[[FMConfig, Any], FoundationModel] = FoundationModel,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """`config.epochs` passes of AdamW over request-shaped batches of events with timestamp
    < end, the learning rate scheduled by `config.lr_at`.

    max_steps caps the total step count (resumed steps included; the lr schedule still spans
    every pass, see `FMConfig.lr_at`). If checkpoint_dir holds a
    checkpoint, training resumes after its step with its optimizer and NE state.
    item_content: optional float [n_items, config.content_dim], the per-item content vectors.
    model_factory: builds the model from (config, item_content) once the seed is set; a
    variant with the same heads and loss (e.g. the user-level-embedding baseline) trains alike.
    device: where to train ("cuda" under torchrun: each rank on cuda:LOCAL_RANK).

    Launched by torchrun with several processes, it trains data-parallel (`fm.distributed`):
    each rank reads the same events and takes its slice of every global batch; every rank
    returns the same weights and the global NE; only rank 0 shows progress and writes
    checkpoints (`checkpoints` is empty on the others). Raises ValueError when
    config.batch_requests is smaller than the number of processes.
    """
    t0 = time.perf_counter()
    ctx = context_from_env(device)
    if config.batch_requests < ctx.world_size:  # checked before any rank waits for the others
        raise ValueError(
            f"batch_requests={config.batch_requests} is smaller than the {ctx.world_size} "
            "training processes: every process needs requests from each global batch"
        )
    join_process_group(ctx)
    if end is not None:
        events = events[events["event_timestamp"] < _utc(end)]
    torch.manual_seed(config.seed)  # the same on every rank: identical initial weights
    histories = UserHistories.from_events(events, config.surfaces)
    requests = Requests.from_events(events, config)
    model = model_factory(config, item_content)
    start_heads_at_base_rates(model, requests)  # a resumed run loads its own biases below
    model = model.to(ctx.device)
    opt = build_optimizer(model, config)
    acc = {t: NEAccumulator() for t in config.fm_tasks}  # this rank's samples only
    pass_ne: list[dict[str, float]] = []  # finished passes
    step = 0

    resume = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if resume is not None:
        loaded, extra = load_checkpoint(resume)
        model.load_state_dict(loaded.state_dict())
        opt.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["rng_state"])
        if ctx.is_main:  # the saved NE sums are global: counted once, on rank 0
            acc = {t: NEAccumulator.from_state(s) for t, s in extra["ne_state"].items()}
        step = int(extra["step"])
        pass_ne = list(extra.get("pass_ne", []))

    bs = config.batch_requests
    per_pass = math.ceil(len(requests) / bs)
    # The lr schedule spans every pass; max_steps only stops early, so a run stopped and resumed
    # with a larger max_steps follows the same schedule as one run straight through.
    horizon = n_steps = per_pass * config.epochs
    if max_steps is not None:
        n_steps = min(n_steps, max_steps)

    def checkpoint(ne: dict[str, NEAccumulator]) -> Path:
        assert checkpoint_dir is not None
        extra = {
            "step": step,
            "n_requests": min(step * bs, len(requests) * config.epochs),
            "pass_ne": pass_ne,
            "optimizer": opt.state_dict(),
            "rng_state": torch.get_rng_state(),
            "ne_state": {t: a.state() for t, a in ne.items()},
        }
        return save_checkpoint(model, Path(checkpoint_dir) / f"step_{step:08d}.pt", extra)

    written: list[Path] = []
    shown = config.main_tasks[:3]
    show = progress and ctx.is_main
    bar = tqdm(total=n_steps, initial=min(step, n_steps), disable=not show, desc="fm train")
    scored = wrap_ddp(_Scored(model), ctx)
    model.train()
    while step < n_steps:
        if step and step % per_pass == 0:  # a new pass: close the last one's NE (collective)
            pass_ne.append({t: a.value() for t, a in all_reduce_ne(acc, ctx).items()})
            acc = {t: NEAccumulator() for t in config.fm_tasks}
        i = step % per_pass
        lo, hi = shard_bounds(
            i * bs, min((i + 1) * bs, len(requests)), ctx.rank, ctx.world_size
        )
        batch = requests.batch(lo, hi, histories, config).to(ctx.device)
        train_step(model, opt, batch, acc, lr=config.lr_at(step, horizon), ctx=ctx, scored=scored)
        step += 1

        # Both conditions are the same on every rank, so all ranks join each all-reduce.
        bar.update(1)
        if step % 10 == 0 or step == n_steps:
            ne = all_reduce_ne(acc, ctx)
            bar.set_postfix({f"ne_{t}": f"{ne[t].value():.4f}" for t in shown})
        if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == n_steps):
            ne = all_reduce_ne(acc, ctx)
            if ctx.is_main:
                written.append(checkpoint(ne))
    bar.close()

    # A collective: no rank returns before rank 0 has written its last checkpoint.
    ne = {t: a.value() for t, a in all_reduce_ne(acc, ctx).items()}
    model.eval()
    return TrainResult(
        model=model,
        ne=ne,
        steps=step,
        seconds=time.perf_counter() - t0,
        checkpoints=written,
        pass_ne=[*pass_ne, ne],
    )


@torch.no_grad()
def evaluate_fm(
    model: FoundationModel,
    events: pd.DataFrame,
    config: FMConfig,
    start: pd.Timestamp,
    end: pd.Timestamp,
    *,
    batch_requests: int = 256,
) -> dict[str, float]:
    """NE per FM task on requests in [start, end), each using history from ALL earlier events."""
    histories = UserHistories.from_events(events, config.surfaces)
    ts = events["event_timestamp"]
    window = events[(ts >= _utc(start)) & (ts < _utc(end))]
    requests = Requests.from_events(window, config)
    acc = {t: NEAccumulator() for t in config.fm_tasks}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for lo in range(0, len(requests), batch_requests):
        batch = requests.batch(lo, min(lo + batch_requests, len(requests)), histories, config)
        batch = batch.to(device)
        _update_ne(acc, model.task_outputs(batch, model(batch)))
    model.train(was_training)
    return {t: a.value() for t, a in acc.items()}
