"""FMConfig: everything needed to rebuild a FoundationModel (and nothing that needs the store)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fm.timefeatures import HOURS_PER_DAY, check_time_zone

LR_DECAYS = ("constant", "cosine", "linear")
RECIPE: dict[str, Any] = {"warmup_steps": 50, "lr_decay": "cosine", "min_lr_frac": 0.1}


@dataclass
class FMConfig:
    # dataset-given fields
    n_items: int
    surfaces: list[str]
    main_tasks: list[str]  # shared by every surface, trained on the main head over the TAE
    aux_tasks: dict[str, list[str]]  # surface -> surface-specific tasks (main tasks excluded)
    n_actions: int  # action ids lie in [0, n_actions)
    # model size
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    max_history: int = 64
    # Width of the item-id table, mapped to d_model by one linear map; 0 = d_model (no map).
    # The id table holds most parameters at small d; a fixed narrow one keeps a wider FM from
    # spending its growth on memorising items (experts/paper/scaling.py measures it).
    item_dim: int = 0
    dropout: float = 0.0
    # training
    lr: float = 3e-3  # peak learning rate (after warm-up)
    weight_decay: float = 0.0  # AdamW decay of the layers' weight matrices
    # AdamW decay of the embedding tables (items, actions, ranks, gaps); None = weight_decay.
    # Apart from the two, biases and LayerNorm gains are never decayed.
    embedding_decay: float | None = None
    batch_requests: int = 64
    # The learning-rate schedule over the run's steps: a linear warm-up over `warmup_steps`
    # (at most a fifth of the run, so a short run still reaches the peak), then "constant", or
    # "cosine" / "linear" decay to `min_lr_frac` * lr at the last step.
    warmup_steps: int = 0
    lr_decay: str = "constant"
    min_lr_frac: float = 0.1
    # Passes over the training window (time order within each). Only the first pass's
    # progressive NE is out of sample; see fm.train.train_streaming.
    epochs: int = 1
    task_weights: dict[str, float] = field(default_factory=dict)  # missing task -> 1.0
    seed: int = 0
    # The FIXED length N that SiLU attention is divided by. A target sees at most max_history
    # history tokens plus itself, hence max_history + 1. Dividing by the batch's longest
    # sequence instead would make a TAE depend on who else is in the batch.
    attn_norm_len: int | None = None
    n_hours: int = 24
    n_time_buckets: int = 32  # log2-bucketed time gaps, bucket 0 = "no history"
    # Width of the optional per-item content vector (the multi-modal stand-in) that f() reads
    # next to the item id; 0 = none. The matrix itself [n_items, content_dim] is given to
    # FoundationModel and kept as a buffer (so checkpoints and serving artifacts carry it).
    content_dim: int = 0
    # The time zone whose local hour of day the FM reads (fm.timefeatures: "UTC", a fixed
    # offset like "+08:00", or an IANA name like "Asia/Shanghai"). The hour is always derived
    # from the event's UTC timestamp in this zone, for training, logging and serving alike.
    # Checkpoints saved before this field existed load as "UTC".
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        if self.attn_norm_len is None:
            self.attn_norm_len = self.max_history + 1
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.n_hours < HOURS_PER_DAY:
            raise ValueError(f"n_hours must be >= {HOURS_PER_DAY} (hour of day), got {self.n_hours}")
        check_time_zone(self.time_zone)
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.epochs < 1 or self.warmup_steps < 0 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"need epochs >= 1, warmup_steps >= 0, 0 <= min_lr_frac <= 1; got "
                             f"{self.epochs}, {self.warmup_steps}, {self.min_lr_frac}")
        if self.item_dim < 0:
            raise ValueError(f"item_dim must be >= 0, got {self.item_dim}")
        if self.content_dim < 0:
            raise ValueError(f"content_dim must be >= 0, got {self.content_dim}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        unknown = set(self.aux_tasks) - set(self.surfaces)
        if unknown:
            raise ValueError(f"aux_tasks names surfaces not in `surfaces`: {sorted(unknown)}")
        clash = {t for ts in self.aux_tasks.values() for t in ts} & set(self.main_tasks)
        if clash:
            raise ValueError(f"aux_tasks must exclude main tasks, found {sorted(clash)}")

    # The presets fix the sizes and the item table's width: 16 wide, lifted to d_model (held-out
    # like NE on ml-latest-small with zero-started item rows, history 32 / 128: d=32 x 2 layers
    # 0.851 vs 0.860, 2 and 3 seeds; d=64 x 3 layers 0.836 vs 0.848, 1 seed; no dropout, which
    # the scaling ladder adds where it measured better, experts/paper/ladder.py's LADDER).
    # The warm-up + cosine recipe measured on ml-latest-small (`RECIPE`; experts/paper/ladder.py
    # passes it, with a peak lr shrinking with width) is not their default: over the few dozen
    # steps of `foundex demo --tiny` it left the FMs barely trained (NE 1.1 to 7.4 on the main
    # tasks, against below 1 at a constant 3e-3).
    @classmethod
    def small(cls, **kw: Any) -> FMConfig:
        return cls(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "item_dim": 16, **kw})

    @classmethod
    def large(cls, **kw: Any) -> FMConfig:
        return cls(**{"d_model": 64, "n_layers": 3, "n_heads": 4, "item_dim": 16, **kw})

    @property
    def item_width(self) -> int:
        """The item-id table's width: item_dim, or d_model where it is 0."""
        return self.item_dim or self.d_model

    @property
    def fm_tasks(self) -> list[str]:
        """Every task the FM trains on: main tasks, then aux tasks in surface order, no repeats."""
        tasks = list(self.main_tasks)
        for s in self.surfaces:
            tasks.extend(t for t in self.aux_tasks.get(s, []) if t not in tasks)
        return tasks

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of step `step` (0-based) of a run of `total_steps` steps."""
        warmup = min(self.warmup_steps, total_steps // 5)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.lr_decay == "constant":
            return self.lr
        span = max(total_steps - warmup - 1, 1)
        done = min((step - warmup) / span, 1.0)  # 0 -> 1 over the decay phase
        shape = 0.5 * (1 + math.cos(math.pi * done)) if self.lr_decay == "cosine" else 1 - done
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * shape)

    def task_weight(self, task: str) -> float:
        return float(self.task_weights.get(task, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FMConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
