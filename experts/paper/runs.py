"""One seed's training: the FM variants, then every expert variant on each chosen surface.

Per seed: a small and a large FM and the UE model (the large FM's size, candidate-free) train
on the FM window in one streaming pass; per surface, every expert variant of
`experts.baselines` trains on the expert window and is judged on the eval window (NE per task).
The result is raw numbers per seed; `experts.paper.stats` aggregates seeds into tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from experts.baselines import ONE_STAGE_HISTORY, VARIANTS, VariantResult, base_frame, train_variant
from experts.paper.data import StudyData
from experts.paper.ladder import fm_config
from experts.paper.plan import Plan
from experts.paper.stats import base_rate_floor
from fm import TAEEngine, UserHistories, train_streaming
from fm.batching import Requests
from fm.metrics import NEAccumulator
from fm.model import FoundationModel
from fm.user_embedding import compute_user_embeddings, train_ue_streaming
from store_bridge.events.schema import EVENT_TIMESTAMP, timestamps_us

TAE_MODELS = ("tae_small", "tae")  # the FM versions whose TAEs the experts read


@dataclass(frozen=True)
class RunContext:
    """What every seed of a study shares: its data, its size, where progress lines go
    (`say`) and whether to show progress bars."""

    study: StudyData
    plan: Plan
    say: Callable[[str], None] = print
    progress: bool = False


@torch.no_grad()
def fm_ne_on_rows(
    model: FoundationModel, histories: UserHistories, rows: pd.DataFrame
) -> dict[str, float]:
    """NE per FM task of `model` on the given impressions (history from `histories`)."""
    config = model.config
    requests = Requests.from_events(rows, config)
    acc = {t: NEAccumulator() for t in config.fm_tasks}
    model.eval()
    for lo in range(0, len(requests), 256):
        batch = requests.batch(lo, min(lo + 256, len(requests)), histories, config)
        for t, (logits, y) in model.task_outputs(batch, model(batch)).items():
            acc[t].update(y.numpy(), torch.sigmoid(logits).numpy())
    return {t: a.value() for t, a in acc.items()}


def train_fms(seed: int, ctx: RunContext) -> dict[str, Any]:
    """The seed's FM variants on the FM window, each trained by the ladder's recipe:
    "tae_small" and "tae" (the plan's small and large size) and "ue" (the candidate-free UE
    model at the large size), in that order."""
    study, plan, say, progress = ctx.study, ctx.plan, ctx.say, ctx.progress
    small, large = plan.fm_sizes
    cfgs = {name: fm_config(study.spec.fm_fields(), size, seed=seed,
                            batch_requests=plan.fm_batch_requests)
            for name, size in (("tae_small", small), ("tae", large))}
    models: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        res = train_streaming(study.events, cfg, end=study.fm_end, max_steps=plan.fm_max_steps,
                              progress=progress)
        models[name] = res.model
        say(f"  seed {seed}: FM {name} (d={cfg.d_model}, history {cfg.max_history}) "
            f"{res.steps} steps in {res.seconds:.1f}s")
    res = train_ue_streaming(study.events, cfgs["tae"], end=study.fm_end,
                             max_steps=plan.fm_max_steps, progress=progress)
    models["ue"] = res.model
    say(f"  seed {seed}: UE model {res.steps} steps in {res.seconds:.1f}s")
    return models


def _rows_vectors(
    rows: pd.DataFrame, engines: dict[str, TAEEngine], ue_model: Any, histories: UserHistories
) -> dict[str, np.ndarray]:
    """TAE (each FM) and UE of every row, as of the row's own time: name -> [n_rows, dim]."""
    users = rows["user_id"].to_numpy(np.int64)
    ts = timestamps_us(rows[EVENT_TIMESTAMP])
    out = {
        name: eng.compute(
            users,
            rows["item_id"].to_numpy(np.int64),
            ts,
            rows["surface"].to_numpy(object),
        )
        for name, eng in engines.items()
    }
    out["ue"] = compute_user_embeddings(ue_model, histories, users, ts)
    return out


def run_surface(
    seed: int, surface: str, ctx: RunContext, models: dict[str, Any], histories: UserHistories
) -> dict[str, Any]:
    """Every expert variant on one surface, fed by `models` (from `train_fms`).

    Returns tasks, fm_ne (model -> task -> NE on the eval rows), expert_ne (variant -> task ->
    NE), flops (variant -> multiply-adds per candidate), params, rows (train/test counts) and
    floor (task -> `stats.base_rate_floor`).
    """
    study, plan, say, progress = ctx.study, ctx.plan, ctx.say, ctx.progress
    events, spec = study.events, study.spec
    engines = {n: TAEEngine(models[n], histories) for n in TAE_MODELS}
    tasks = [t for t in spec.surface_tasks[surface] if t in events.columns]
    rows = events[(events["surface"] == surface) & (events[EVENT_TIMESTAMP] >= study.fm_end)]
    rows = rows.reset_index(drop=True)
    is_test = (rows[EVENT_TIMESTAMP] >= study.eval_start).to_numpy()
    test_rows = rows[is_test]
    fm_ne = {n: fm_ne_on_rows(models[n], histories, test_rows) for n in models}
    vectors = _rows_vectors(rows, engines, models["ue"], histories)
    hist_len = plan.expert.history_length * ONE_STAGE_HISTORY  # the one-stage's history
    frame = base_frame(rows, events, study.items, tasks, hist_len)
    train, test = frame[~is_test], frame[is_test]
    size = plan.expert.for_rows(len(train))
    v_tr = {k: v[~is_test] for k, v in vectors.items()}
    v_te = {k: v[is_test] for k, v in vectors.items()}
    results: dict[str, VariantResult] = {}
    t0 = time.perf_counter()
    for variant in VARIANTS:
        results[variant] = train_variant(
            variant, train, test, v_tr, v_te, surface=surface, tasks=tasks,
            size=size, seed=seed, n_items=spec.n_items,
            n_categories=max(spec.n_categories, 1), n_actions=spec.n_actions,
            progress=progress,
        )
    say(f"  seed {seed}: {surface}: {len(train):,} train / {len(test):,} test rows, "
        f"{'<= ' if size.holdout_frac else ''}{size.epochs} epochs, {len(VARIANTS)} experts in "
        f"{time.perf_counter() - t0:.1f}s")
    return {
        "tasks": tasks,
        "fm_ne": fm_ne,
        "expert_ne": {k: r.ne for k, r in results.items()},
        "flops": {k: r.flops for k, r in results.items()},
        "params": {k: r.params for k, r in results.items()},
        "rows": {"train": int(len(train)), "test": int(len(test))},
        "floor": {t: base_rate_floor(train[t].to_numpy(np.float64), test[t].to_numpy(np.float64))
                  for t in tasks},
    }


def run_seed(seed: int, ctx: RunContext) -> dict[str, Any]:
    """One seed: FMs, UE model, every variant per surface -> {"surfaces": surface -> the
    numbers of `run_surface`}."""
    models = train_fms(seed, ctx)
    histories = UserHistories.from_events(ctx.study.events, ctx.study.spec.surfaces)
    surfaces = {
        surface: run_surface(seed, surface, ctx, models, histories)
        for surface in ctx.study.surfaces
    }
    return {"surfaces": surfaces}
