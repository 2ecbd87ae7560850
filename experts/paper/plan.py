"""How big a paper-tables run is: data subsample, which FM sizes, FM steps and expert size,
from a time budget."""

from __future__ import annotations

from dataclasses import dataclass

from experts.baselines import ExpertSize
from experts.paper.ladder import FMSize, rung


@dataclass
class Plan:
    """How big a run is, derived from the time budget. The small and the large FM are two rungs
    of the scaling ladder (`experts.paper.ladder`), trained by its recipe; the UE model takes
    the large one's size."""

    max_users: int | None  # users kept (random subsample); None = all
    fm_sizes: tuple[FMSize, FMSize]  # (small, large)
    fm_max_steps: int | None  # None: one pass over the FM window
    expert: ExpertSize
    max_surfaces: int
    fm_batch_requests: int = 64


# Experts hold out the last 10% of their training window and stop when its loss stops falling
# (experts.train). Without it they overfit on KuaiRand-Pure: the no-FM expert's click NE was
# 1.051 on tab0 (3.9k training rows; the base-rate shift alone costs 1.0001) and 0.981 on
# tab1, with it 1.003 and 0.956 (3 seeds each).
HOLDOUT = 0.1


# FM + UE-model seconds per step at the ladder's m (batch 64, 2 shared cores): ~0.05 s each
# on KuaiRand-Pure, ~0.04 s on ml-latest-small.
M_STEP_S = 0.1


def plan_for(budget_s: float, n_seeds: int, data: str = "synthetic") -> Plan:
    """Scale data, FM sizes and steps so a run takes about `budget_s` seconds on 2 shared CPU
    cores.

    Real data: the small FM is the ladder's xs; with 900 s or more per seed the large one is
    its xl and both make one full pass over the FM window, else its m with steps capped to
    spend about half the seed on the FM and the UE model. The xl plan is the slow one: with
    three other long runs sharing the two cores a seed took ~25 min on KuaiRand-Pure (6-11 min
    of it training the xl FM and the UE model, most of the rest computing their embeddings for
    every row at history 128) and longer on ml-latest-small, whose histories fill all 128
    events. Synthetic data: three tiers of users, steps and sizes.
    """
    per_seed = budget_s / max(n_seeds, 1)
    if data != "synthetic":
        expert = ExpertSize(64, 8, 2, 1024, min_steps=150, max_epochs=4, holdout_frac=HOLDOUT)
        if per_seed >= 900:
            return Plan(None, (rung("xs"), rung("xl")), None, expert, 3)
        steps = max(50, int(per_seed * 0.5 / M_STEP_S))
        return Plan(None, (rung("xs"), rung("m")), steps, expert, 3)
    if per_seed < 80:
        return Plan(250, (rung("xs"), rung("s")), 120,
                    ExpertSize(32, 8, 2, 256, min_steps=100, max_epochs=6, holdout_frac=HOLDOUT), 1)
    if per_seed < 300:
        return Plan(800, (rung("xs"), rung("m")), 400,
                    ExpertSize(48, 8, 2, 512, min_steps=150, max_epochs=8, holdout_frac=HOLDOUT), 1)
    return Plan(3000, (rung("xs"), rung("xl")), 1500,
                ExpertSize(64, 8, 2, 512, min_steps=200, max_epochs=8, holdout_frac=HOLDOUT), 1)
