"""Continuous FM training: one request-shaped batch at a time, from wherever batches come.

`fm.train.train_streaming` walks a fixed, time-ordered log. A follower (`foundex fm train
--follow`, store_bridge.streams.fm_follow) gets its batches from the live event stream, one
at a time, for as long as it runs. `StreamingTrainer` is that trainer's state (model, AdamW,
progressive-NE accumulators, step count) and its step, which is `fm.train.train_step`: the
batch is scored first (progressive validation: the NE is out of sample), then learned from.

Learning rate: constant, by default the one the published run ended at (`follow_lr`): a
follower continues a finished run, it does not warm up and decay again.

Checkpoints are `fm.checkpoint` files whose `extra` holds the step, the optimizer and NE
state and the RNG state, plus whatever the caller adds (the follower's stream position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fm.batching import Batch, Requests
from fm.checkpoint import load_checkpoint, save_checkpoint
from fm.config import FMConfig
from fm.history import UserHistories
from fm.metrics import NEAccumulator
from fm.model import FoundationModel
from fm.train import build_optimizer, train_step


def follow_lr(config: FMConfig) -> float:
    """The learning rate a run with `config` ends at: the peak lr for a constant schedule,
    `min_lr_frac` * lr after a decay (`FMConfig.lr_at` at the last step)."""
    return config.lr if config.lr_decay == "constant" else config.lr * config.min_lr_frac


@dataclass
class StepMetrics:
    """What one `train_batch` did."""

    step: int  # steps done, this one included (resumed steps too)
    requests: int  # rows of the batch (requests)
    events: int  # candidates in the batch (one per event)
    loss: float  # the weighted multi-task loss the step descended
    ne: dict[str, float]  # progressive NE per FM task since the trainer started (resumed: since
    # the run started), each batch scored before it was learned from


class StreamingTrainer:
    """A FoundationModel under AdamW, trained one batch per `train_batch` call."""

    def __init__(
        self,
        model: FoundationModel,
        *,
        optimizer_state: dict[str, Any] | None = None,
        step: int = 0,
        ne_state: dict[str, Any] | None = None,
        lr: float | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """model: with its task heads (a training checkpoint, not a serving artifact).
        optimizer_state: AdamW state to carry on from (None: fresh moments). ne_state: the
        progressive NE sums to continue (`NEAccumulator.state` per task). lr: constant
        learning rate (default `follow_lr(model.config)`). Raises ValueError for a model
        without heads, a negative step or lr <= 0."""
        if model.main_head is None:
            raise ValueError("a serving artifact has no task heads: train from the training "
                             "checkpoint")  # fmt: skip
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.config = model.config
        self.lr = follow_lr(self.config) if lr is None else float(lr)
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.opt = build_optimizer(self.model, self.config)
        if optimizer_state is not None:
            self.opt.load_state_dict(optimizer_state)
        self.acc = {t: NEAccumulator() for t in self.config.fm_tasks}
        for t, s in (ne_state or {}).items():
            if t in self.acc:
                self.acc[t] = NEAccumulator.from_state(s)
        self.step = int(step)
        self.model.train()

    # --- starting and resuming ------------------------------------------------------------

    @classmethod
    def start(
        cls, checkpoint: str | Path, *, lr: float | None = None, device: str | torch.device = "cpu"
    ) -> StreamingTrainer:
        """From a training checkpoint (a published version's): its weights and, when it carries
        a fitting one, its AdamW state (the moments carry on); step 0, NE from scratch. Raises
        fm.checkpoint.CheckpointError (a ValueError) for a file that is not a checkpoint."""
        model, extra = load_checkpoint(checkpoint)
        trainer = cls(model, lr=lr, device=device)
        opt_state = extra.get("optimizer")
        if isinstance(opt_state, dict):
            try:
                trainer.opt.load_state_dict(opt_state)
            except (ValueError, KeyError):  # another param-group layout: fresh moments
                trainer.opt = build_optimizer(trainer.model, trainer.config)
        return trainer

    @classmethod
    def resume(
        cls, checkpoint: str | Path, *, lr: float | None = None, device: str | torch.device = "cpu"
    ) -> tuple[StreamingTrainer, dict[str, Any]]:
        """From a checkpoint `save` wrote -> (the trainer as it was: weights, AdamW, step, NE,
        RNG state; the caller's `extra`). Raises CheckpointError for a foreign file and
        ValueError for a checkpoint without the trainer's state."""
        model, extra = load_checkpoint(checkpoint)
        missing = [k for k in ("step", "optimizer", "ne_state") if k not in extra]
        if missing:
            raise ValueError(f"{checkpoint} is not a follow checkpoint: it lacks {missing}")
        trainer = cls(
            model, optimizer_state=extra["optimizer"], step=int(extra["step"]),
            ne_state=extra["ne_state"], lr=lr, device=device,
        )  # fmt: skip
        if "rng_state" in extra:
            torch.set_rng_state(extra["rng_state"])
        return trainer, dict(extra.get("caller", {}))

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the trainer's state (atomically) with the caller's `extra` (plain data)."""
        return save_checkpoint(
            self.model,
            path,
            {
                "step": self.step,
                "optimizer": self.opt.state_dict(),
                "rng_state": torch.get_rng_state(),
                "ne_state": {t: a.state() for t, a in self.acc.items()},
                "caller": extra or {},
            },
        )

    # --- training -------------------------------------------------------------------------

    def ne(self) -> dict[str, float]:
        """Progressive NE per FM task so far (NaN for a task without labelled samples yet)."""
        return {t: a.value() for t, a in self.acc.items()}

    def train_batch(self, batch: Batch) -> StepMetrics:
        """Score `batch` (progressive validation), then learn from it: one AdamW step."""
        loss = train_step(self.model, self.opt, batch.to(self.device), self.acc, lr=self.lr)
        self.step += 1
        return StepMetrics(
            step=self.step,
            requests=int(batch.tgt_item.shape[0]),
            events=int(batch.tgt_mask.sum()),
            loss=float(loss),
            ne=self.ne(),
        )

    def train_requests(self, requests: Requests, histories: UserHistories) -> StepMetrics:
        """All of `requests` as one batch, each request's history strictly before its time
        looked up in `histories`. Raises ValueError when there is no request."""
        if len(requests) == 0:
            raise ValueError("a training step needs at least one request")
        return self.train_batch(requests.batch(0, len(requests), histories, self.config))

    def train_events(self, events: pd.DataFrame, histories: UserHistories) -> StepMetrics:
        """Events (the canonical log's columns, every FM task among them) grouped into requests
        as `fm.batching.Requests` does, as one batch. Raises ValueError for a missing task
        column, an unknown surface, or no events."""
        return self.train_requests(Requests.from_events(events, self.config), histories)
