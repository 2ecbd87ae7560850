"""The FM sizes of the offline studies and the one recipe they all train by.

`foundex scaling` sweeps the whole ladder; `foundex paper-tables` trains two of its rungs as
its small and large FM (`experts.paper.plan`), so both studies' FMs come from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fm import FMConfig
from fm.config import RECIPE

# The measured recipe (ml-latest-small, held-out NE on the expert window): linear warm-up then
# cosine decay to 10% of the peak (like 0.849 -> 0.843 at d=32 vs a constant lr); the peak lr
# shrinks with width: 3e-3 is best at d <= 32, at d=64 3e-3 overfits (0.903) and 1e-3 is right
# (0.849), so lr = LR_BASE * (32 / d)^1.6, at most LR_BASE (`peak_lr`); 1e-3 at d=16 left the FM
# undertrained (0.879 vs 0.851). Passes: 3 gave 0.838 vs 0.843 for 3x the compute, so the sweep
# makes one unless its budget is large (`scaling_plan`). Item rows start at zero (fm.model), heads
# at the base rates (fm.train); the sizes past d=16 keep the item table 16 wide (LADDER's notes).
LR_BASE = 3e-3
LR_WIDTH_REF, LR_WIDTH_POWER = 32, 1.6  # peak lr = LR_BASE * (LR_WIDTH_REF / d)^LR_WIDTH_POWER
ITEM_DIM = 16  # the item-id table's width past d=16 (FMConfig.item_dim)


@dataclass(frozen=True)
class FMSize:
    """One rung of the ladder: width, depth, heads and history length together, with the
    regularisation that size needs on small data (item-table width, dropout)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    max_history: int
    item_dim: int = 0  # 0: the table is d_model wide
    dropout: float = 0.0


# ~4k .. ~16M multiply-adds per candidate (~3,500x); a short sweep keeps the first n.
# Measured on ml-latest-small (held-out like NE on the expert window, 1-3 seeds, zero-initialised
# item rows): d=8 with history 4 0.862; d=16 with history 8 or 16 0.845; d=32 x 2 layers with
# history 32 overfits as is (0.860), 0.851 with a 16-wide item table, 0.844 with the table and
# dropout 0.2; d=48 x 2, history 96, with both: 0.841; d=64 x 3, history 128: 0.848 as is, 0.836
# with the 16-wide table, 0.846 and 0.855 with dropout 0.1 and 0.2 on top.
LADDER = (
    FMSize("xs", 8, 1, 1, 4),
    FMSize("s", 16, 1, 1, 8),
    FMSize("m", 32, 2, 2, 32, item_dim=ITEM_DIM, dropout=0.2),
    FMSize("l", 48, 2, 4, 96, item_dim=ITEM_DIM, dropout=0.2),
    FMSize("xl", 64, 3, 4, 128, item_dim=ITEM_DIM),
)


def rung(name: str) -> FMSize:
    """The ladder's size called `name`; ValueError naming the known ones otherwise."""
    for size in LADDER:
        if size.name == name:
            return size
    raise ValueError(f"unknown FM size {name!r}; the ladder has {[s.name for s in LADDER]}")


def peak_lr(d_model: int) -> float:
    """The recipe's peak learning rate at width d_model (see LR_BASE)."""
    return min(LR_BASE, LR_BASE * (LR_WIDTH_REF / d_model) ** LR_WIDTH_POWER)


def recipe_record() -> dict[str, Any]:
    """The recipe as the studies' result.json keep it: RECIPE's schedule and the peak lr's law."""
    return {"lr_base": LR_BASE, "lr_width_ref": LR_WIDTH_REF, "lr_width_power": LR_WIDTH_POWER,
            **RECIPE}


def fm_config(dataset_fields: dict[str, Any], size: FMSize, *, seed: int, batch_requests: int,
              epochs: int = 1) -> FMConfig:
    """The FMConfig of one rung trained by the recipe: `RECIPE`'s schedule at `peak_lr`.
    `dataset_fields`: `DatasetSpec.fm_fields()` (items, surfaces, tasks, actions)."""
    return FMConfig(**dataset_fields, d_model=size.d_model, n_layers=size.n_layers,
                    n_heads=size.n_heads, max_history=size.max_history, item_dim=size.item_dim,
                    dropout=size.dropout, lr=peak_lr(size.d_model),
                    batch_requests=batch_requests, epochs=epochs, seed=seed, **RECIPE)
