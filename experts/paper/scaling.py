"""`foundex scaling`: FM quality and expert quality against FM compute, over a ladder of sizes.

Per seed and size: an FM of that size (width, depth and history length grow together) trains
on the FM window by one recipe (`experts.paper.ladder`); its NE per FM task (main and the
surface's aux) is measured on the evaluation window and on the expert window (the held-out
window right after its own), and one expert config (+TAE, `experts.baselines`) is trained on
the expert window with that FM's TAEs and judged on the evaluation window. A no-FM expert per
seed gives the floor.

Compute C = `fm_flops_per_candidate`: multiply-adds of the FM encoder for one candidate with a
full history. Over sizes, the mean NE is fitted to NE(C) = a * C^(-b) + c (`fit_power_law`);
Transfer Ratios between sizes are judged by `experts.paper.stats.transfer_row` (paired by seed;
TR only where the larger FM is clearly better). The report, PNG and result.json follow
`paper-tables` (`experts.paper.report`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experts.baselines import ExpertSize, base_frame, train_variant
from experts.paper.data import StudyData, load_study_data
from experts.paper.ladder import LADDER, FMSize, fm_config, recipe_record
from experts.paper.plan import Plan
from experts.paper.report import json_safe
from experts.paper.runs import fm_ne_on_rows
from experts.paper.stats import JUDGE, TR_NA, mean_std, transfer_row
from experts.train import torch_threads
from fm import FMConfig, TAEEngine, UserHistories, train_streaming
from store_bridge.events.schema import EVENT_TIMESTAMP, timestamps_us


@dataclass
class ScalingPlan:
    """How big a sweep is. fm_max_steps caps each FM's steps (None: the recipe's passes);
    epochs: passes over the FM window."""

    sizes: list[FMSize] = field(default_factory=lambda: list(LADDER))
    epochs: int = 1
    fm_max_steps: int | None = None
    fm_batch_requests: int = 64
    expert: ExpertSize = field(default_factory=lambda: ExpertSize(
        64, 8, 2, 1024, min_steps=150, max_epochs=4))
    max_users: int | None = None
    max_surfaces: int = 1

    def data_plan(self) -> Plan:
        """The `paper-tables` plan that loads the same data (`experts.paper.data`)."""
        return Plan(self.max_users, (self.sizes[0], self.sizes[-1]), self.fm_max_steps,
                    self.expert, self.max_surfaces, self.fm_batch_requests)


def scaling_plan(budget_s: float, n_seeds: int, data: str = "synthetic") -> ScalingPlan:
    """A sweep that fits about `budget_s` seconds on 2 shared CPU cores.

    Measured on ml-latest-small (60k FM-window ratings, 2 shared cores): one pass of the
    largest rung ~3 min, of the smallest ~40 s; the expert ~20 s. Under ~25 min per seed the
    sweep keeps one pass, under ~8 min it also drops the largest rung.
    """
    per_seed = budget_s / max(n_seeds, 1)
    if data == "synthetic":
        if per_seed < 120:
            return ScalingPlan(list(LADDER[:2]), fm_max_steps=40, max_users=200,
                               expert=ExpertSize(32, 8, 2, 256, min_steps=40, max_epochs=2))
        return ScalingPlan(list(LADDER), epochs=2, max_users=1500,
                           expert=ExpertSize(48, 8, 2, 512, min_steps=150, max_epochs=8))
    epochs = 2 if per_seed >= 1500 else 1
    sizes = list(LADDER) if per_seed >= 480 else list(LADDER[:4])
    return ScalingPlan(sizes, epochs=epochs)


def fm_flops_per_candidate(config: FMConfig) -> int:
    """Multiply-adds of the FM encoder to produce one TAE from a full history, over its
    n = max_history + 1 tokens: per token, f(item, context)'s MLP ((3d + content_dim) -> 2d -> d)
    and the item table's lift to d (item_dim x d, when the table is narrower); per layer and
    token, the fused U/V/Q/K projection (4 d^2) and the output projection (d^2), plus causal
    attention (Q.K and A.V: 2 d per attending pair, n(n+1)/2 pairs). Embedding lookups and
    heads are left out (no multiply-adds or not on the TAE path)."""
    d, n = config.d_model, config.max_history + 1
    lift = config.item_width * d if config.item_width != d else 0
    per_token = (3 * d + config.content_dim) * 2 * d + 2 * d * d + lift
    layers = config.n_layers * (n * 5 * d * d + n * (n + 1) // 2 * 2 * d)
    return int(n * per_token + layers)


def fit_power_law(compute: list[float] | np.ndarray, ne: list[float] | np.ndarray,
                  n_grid: int = 400) -> dict[str, float]:
    """Fit NE(C) = a * C^(-b) + c by a grid over c in [0, min(NE)) and, for each c, linear least
    squares of log(NE - c) on log C (slope -b, intercept log a); the c with the least squared
    error in NE itself wins. Returns {"a", "b", "c", "r2"} (r2 of the fitted NE, 1 - SSE/SST).

    Raises ValueError for fewer than 3 points, non-positive compute or non-finite values."""
    x = np.asarray(compute, dtype=np.float64)
    y = np.asarray(ne, dtype=np.float64)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need >= 3 (compute, NE) points of equal count, got {len(x)}, {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x <= 0).any():
        raise ValueError("compute must be positive and every value finite")
    lx = np.log(x)
    design = np.stack([np.ones_like(lx), -lx], axis=1)
    best: tuple[float, float, float, float] | None = None
    # c stays below the smallest NE so that log(NE - c) exists; 0 is the pure power law.
    for c in np.linspace(0.0, y.min(), n_grid, endpoint=False):
        coef, *_ = np.linalg.lstsq(design, np.log(y - c), rcond=None)
        a, b = math.exp(coef[0]), float(coef[1])
        sse = float(((a * x ** -b + c - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, a, b, float(c))
    sse, a, b, c = best  # type: ignore[misc]
    sst = float(((y - y.mean()) ** 2).sum())
    return {"a": a, "b": b, "c": c, "r2": 1.0 - sse / sst if sst > 0 else math.nan}


# ---- one seed ---------------------------------------------------------------------------


def run_size(seed: int, size: FMSize, study: StudyData, plan: ScalingPlan,
             histories: UserHistories, frames: dict[str, Any], *,
             device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """One FM size on one seed: the FM, its NE on each surface's eval rows, and the +TAE expert
    fed by its TAEs. Returns {"fm_ne": surface -> task -> NE, "fm_next_ne": the same on the
    expert window (the FM's next, held-out window; nearer its training data than the evaluation
    window), "expert_ne": as fm_ne for the expert, "flops", "params", "fm_steps", "fm_seconds",
    "pass_ne" (progressive NE per pass)}.
    `frames`: surface -> (rows, train frame, test frame, is_test, tasks) from
    `_surface_frames`. The FM trains on `device`; NE and TAEs are computed on the CPU."""
    cfg = fm_config(study.spec.fm_fields(), size, seed=seed,
                    batch_requests=plan.fm_batch_requests, epochs=plan.epochs)
    res = train_streaming(study.events, cfg, end=study.fm_end, max_steps=plan.fm_max_steps,
                          progress=progress, device=device)
    res.model.to("cpu")
    engine = TAEEngine(res.model, histories)
    fm_ne, fm_next_ne, expert_ne = {}, {}, {}
    for surface, (rows, train, test, is_test, tasks) in frames.items():
        fm_ne[surface] = fm_ne_on_rows(res.model, histories, rows[is_test])
        fm_next_ne[surface] = fm_ne_on_rows(res.model, histories, rows[~is_test])
        tae = engine.compute(rows["user_id"].to_numpy(np.int64),
                             rows["item_id"].to_numpy(np.int64),
                             timestamps_us(rows[EVENT_TIMESTAMP]),
                             rows["surface"].to_numpy(object))
        expert_ne[surface] = _expert(study, plan, "tae", seed, surface, tasks, train, test,
                                     {"tae": tae[~is_test]}, {"tae": tae[is_test]})
    return {"fm_ne": fm_ne, "fm_next_ne": fm_next_ne, "expert_ne": expert_ne,
            "flops": fm_flops_per_candidate(cfg),
            "params": sum(p.numel() for p in res.model.parameters()), "fm_steps": res.steps,
            "fm_seconds": res.seconds, "pass_ne": res.pass_ne}


def _expert(study: StudyData, plan: ScalingPlan, variant: str, seed: int, surface: str,
            tasks: list[str], train: Any, test: Any, v_tr: dict[str, np.ndarray],
            v_te: dict[str, np.ndarray]) -> dict[str, float]:
    spec = study.spec
    return train_variant(variant, train, test, v_tr, v_te, surface=surface, tasks=tasks,
                         size=plan.expert.for_rows(len(train)), seed=seed, n_items=spec.n_items,
                         n_categories=max(spec.n_categories, 1), n_actions=spec.n_actions).ne


def _surface_frames(study: StudyData, plan: ScalingPlan) -> dict[str, tuple]:
    """surface -> (rows after the FM window, expert train frame, eval frame, is_test, tasks)."""
    events, out = study.events, {}
    for surface in study.surfaces:
        tasks = [t for t in study.spec.surface_tasks[surface] if t in events.columns]
        rows = events[(events["surface"] == surface) & (events[EVENT_TIMESTAMP] >= study.fm_end)]
        rows = rows.reset_index(drop=True)
        is_test = (rows[EVENT_TIMESTAMP] >= study.eval_start).to_numpy()
        frame = base_frame(rows, events, study.items, tasks, plan.expert.history_length)
        out[surface] = (rows, frame[~is_test], frame[is_test], is_test, tasks)
    return out


def run_seed(seed: int, study: StudyData, plan: ScalingPlan, *, say: Callable[[str], None],
             device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Every size on one seed, plus the no-FM expert: {"sizes": name -> `run_size`'s numbers,
    "nofm_ne": surface -> task -> NE}."""
    histories = UserHistories.from_events(study.events, study.spec.surfaces)
    frames = _surface_frames(study, plan)
    nofm = {s: _expert(study, plan, "nofm", seed, s, f[4], f[1], f[2], {}, {})
            for s, f in frames.items()}
    sizes = {}
    for size in plan.sizes:
        t0 = time.perf_counter()
        sizes[size.name] = run_size(seed, size, study, plan, histories, frames,
                                    device=device, progress=progress)
        say(f"  seed {seed}: size {size.name} ({sizes[size.name]['flops']:,} FLOPs, "
            f"{sizes[size.name]['fm_steps']} FM steps) in {time.perf_counter() - t0:.0f}s")
    return {"sizes": sizes, "nofm_ne": nofm}


# ---- across seeds -----------------------------------------------------------------------


def fm_tasks(study: StudyData, surface: str) -> list[str]:
    """The tasks the FM trains on that `surface` has: main tasks, then the surface's aux tasks
    (MovieLens: like, then love)."""
    fields = study.spec.fm_fields()
    return [*fields["main_tasks"], *fields["aux_tasks"].get(surface, [])]


def size_rows(per_seed: list[dict[str, Any]], plan: ScalingPlan, study: StudyData
              ) -> list[dict[str, Any]]:
    """One row per (surface, FM task, size): FLOPs, FM NE (evaluation and expert window) and
    expert NE (mean ± std cells)."""
    rows = []
    for surface in study.surfaces:
        for task in fm_tasks(study, surface):
            for size in plan.sizes:
                runs = [s["sizes"][size.name] for s in per_seed]
                rows.append({
                    "surface": surface, "task": task, "size": size.name, **asdict(size),
                    "flops": runs[0]["flops"], "params": runs[0]["params"],
                    "fm_ne": mean_std([r["fm_ne"][surface].get(task) for r in runs]),
                    "fm_next_ne": mean_std([r.get("fm_next_ne", {}).get(surface, {}).get(task)
                                            for r in runs]),
                    "expert_ne": mean_std([r["expert_ne"][surface].get(task) for r in runs]),
                    "nofm_ne": mean_std([s["nofm_ne"][surface].get(task) for s in per_seed]),
                })
    return rows


def fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The power-law fit of FM NE (both windows) and of expert NE against FLOPs per (surface,
    task), over the sizes' mean NE; model "fm", "fm_next" or "expert"; {"error": ...} where it
    cannot be fitted (fewer than 3 sizes with NE)."""
    out = []
    for key in sorted({(r["surface"], r["task"]) for r in rows}):
        mine = [r for r in rows if (r["surface"], r["task"]) == key]
        for model in ("fm_ne", "fm_next_ne", "expert_ne"):
            flops = [r["flops"] for r in mine if r[model]["mean"] is not None]
            ne = [r[model]["mean"] for r in mine if r[model]["mean"] is not None]
            try:
                fit: dict[str, Any] = fit_power_law(flops, ne)
            except ValueError as e:  # too few sizes with numbers
                fit = {"error": str(e)}
            out.append({"surface": key[0], "task": key[1], "model": model.removesuffix("_ne"),
                        **fit})
    return out


def transfers(per_seed: list[dict[str, Any]], plan: ScalingPlan, study: StudyData
              ) -> list[dict[str, Any]]:
    """TR for consecutive sizes and smallest -> largest, per surface and FM task, by
    `stats.transfer_row` (paired by seed; TR only where the larger FM is clearly better)."""
    names = [s.name for s in plan.sizes]
    pairs = list(zip(names, names[1:], strict=False))
    if len(names) > 2:
        pairs.append((names[0], names[-1]))
    out = []
    for surface in study.surfaces:
        for task in fm_tasks(study, surface):
            for small, large in pairs:
                seeds = [{"fm_ne": {"tae_small": s["sizes"][small]["fm_ne"][surface],
                                    "tae": s["sizes"][large]["fm_ne"][surface], "ue": {}},
                          "expert_ne": {"tae_small": s["sizes"][small]["expert_ne"][surface],
                                        "tae": s["sizes"][large]["expert_ne"][surface]}}
                         for s in per_seed]
                row = transfer_row(surface, task, seeds)
                out.append({"small": small, "large": large, **row})
    return out


def run(
    data: str = "synthetic",
    data_path: str | Path | None = None,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    time_budget_s: float = 1800.0,
    out_dir: str | Path = "scaling",
    *,
    device: str = "cpu",
    say: Callable[[str], None] = print,
    progress: bool = False,
    plan: ScalingPlan | None = None,
) -> dict[str, Any]:
    """The sweep: every size on every seed; writes out_dir/report.md, result.json, scaling.png.

    Returns the JSON-safe result: data, seeds, plan, events, users, windows, rows, fits,
    transfers, per_seed, seconds, plots. Raises ValueError without seeds or with fewer than 2
    sizes, `experts.paper.data.DataError` when the dataset cannot be read.
    """
    from experts.paper.scaling_report import plot, write_report

    t_start = time.perf_counter()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    plan = plan or scaling_plan(time_budget_s, len(seeds), data)
    if len(plan.sizes) < 2:
        raise ValueError("a sweep needs at least 2 sizes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"plan: {plan}")
    study = load_study_data(data, data_path, plan.data_plan())
    say(f"data {data}: {len(study.events):,} events, {study.events['user_id'].nunique():,} "
        f"users, surfaces {study.surfaces}")
    with torch_threads(1):  # a shared 2-core box: one intra-op thread is faster here
        per_seed = []
        for i, seed in enumerate(seeds):
            say(f"seed {seed} ({i + 1}/{len(seeds)}), {time.perf_counter() - t_start:.0f}s")
            per_seed.append(run_seed(seed, study, plan, say=say, device=device,
                                     progress=progress))
    rows = size_rows(per_seed, plan, study)
    result: dict[str, Any] = {
        "data": data, "seeds": seeds, "surfaces": study.surfaces,
        "plan": {"sizes": [asdict(s) for s in plan.sizes], "epochs": plan.epochs,
                 "fm_max_steps": plan.fm_max_steps, "recipe": recipe_record(),
                 "fm_batch_requests": plan.fm_batch_requests, "expert": asdict(plan.expert)},
        "events": int(len(study.events)), "users": int(study.events["user_id"].nunique()),
        "windows": {k: (a.isoformat(), b.isoformat()) for k, (a, b) in study.windows.items()},
        "judge": JUDGE, "tr_na": TR_NA,
        "rows": rows, "fits": fits(rows), "transfers": transfers(per_seed, plan, study),
        "per_seed": per_seed,
    }
    result["seconds"] = time.perf_counter() - t_start
    result["plots"] = [plot(result, out)]
    result = json_safe(result)
    write_report(result, out)
    return result
