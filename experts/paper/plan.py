"""How big a paper-tables run is: data subsample, FM steps and expert size from a time budget."""

from __future__ import annotations

from dataclasses import dataclass

from experts.baselines import ExpertSize


@dataclass
class Plan:
    """How big a run is, derived from the time budget."""

    max_users: int | None  # users kept (random subsample); None = all
    fm_max_history: int
    fm_max_steps: int | None
    expert: ExpertSize
    max_surfaces: int
    fm_batch_requests: int = 64


def plan_for(budget_s: float, n_seeds: int, data: str = "synthetic") -> Plan:
    """Scale data and steps so a run takes at most about `budget_s` seconds on 2 shared CPU cores.

    Measured there: a synthetic seed takes ~17 s at the first tier and ~80 s at the second; on
    KuaiRand-Pure an FM step (128 one-impression requests, history 48) ~0.09 s, and the
    experts of 3 surfaces ~40% of a seed's time.
    """
    per_seed = budget_s / max(n_seeds, 1)
    if data != "synthetic":
        steps = max(20, int(per_seed * 0.55 / (3 * 0.09)))
        expert = ExpertSize(64, 8, 2, 1024, min_steps=150, max_epochs=4)
        return Plan(None, 48, steps, expert, 3, fm_batch_requests=128)
    if per_seed < 80:
        return Plan(250, 16, 120, ExpertSize(32, 8, 2, 256, min_steps=100, max_epochs=6), 1)
    if per_seed < 300:
        return Plan(800, 32, 400, ExpertSize(48, 8, 2, 512, min_steps=150, max_epochs=8), 1)
    return Plan(3000, 48, 1500, ExpertSize(64, 8, 2, 512, min_steps=200, max_epochs=8), 1)
