"""`foundex paper-tables`: the paper's four tables on one dataset over several seeds.

Plan the run's size from the time budget, load the data (`data`), train every seed (`runs`),
aggregate the seeds into tables and judge the targets (`stats`), then write the report, the
plots and result.json (`report`). See `experts.paper` for what each table holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experts.paper.data import load_study_data
from experts.paper.ladder import recipe_record
from experts.paper.plan import Plan, plan_for
from experts.paper.report import json_safe, plots, write_report
from experts.paper.runs import RunContext, run_seed
from experts.paper.stats import build_tables, check_targets
from experts.train import torch_threads


def run(
    data: str = "synthetic",
    data_path: str | Path | None = None,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    time_budget_s: float = 120.0,
    out_dir: str | Path = "paper_tables",
    *,
    say: Callable[[str], None] = print,
    progress: bool = False,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """Compute the four tables; write out_dir/report.md, result.json and PNG plots.

    Returns the JSON-safe result: data, seeds, surfaces, plan, events, users, windows, unseen_tasks,
    tables, per_seed, targets, seconds, plots. Raises ValueError without seeds and
    `experts.paper.data.DataError` when the dataset cannot be read.
    """
    t_start = time.perf_counter()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_for(time_budget_s, len(seeds), data)
    say(f"plan: {plan}")
    study = load_study_data(data, data_path, plan)
    events = study.events
    say(f"data {data}: {len(events):,} events, {events['user_id'].nunique():,} users, "
        f"surfaces {study.surfaces}")
    ctx = RunContext(study, plan, say=say, progress=progress)
    with torch_threads(1):  # a shared 2-core box: one intra-op thread is faster here
        per_seed = []
        for i, seed in enumerate(seeds):
            say(f"seed {seed} ({i + 1}/{len(seeds)}), {time.perf_counter() - t_start:.0f}s")
            per_seed.append(run_seed(seed, ctx))
    result: dict[str, Any] = {
        "data": data,
        "seeds": seeds,
        "surfaces": study.surfaces,
        "plan": {"fm_sizes": [asdict(s) for s in plan.fm_sizes], "fm_max_steps": plan.fm_max_steps,
                 "fm_batch_requests": plan.fm_batch_requests,
                 "recipe": recipe_record(), "expert": asdict(plan.expert)},
        "events": int(len(events)),
        "users": int(events["user_id"].nunique()),
        "windows": {k: (a.isoformat(), b.isoformat()) for k, (a, b) in study.windows.items()},
        "unseen_tasks": list(study.spec.unseen_tasks),
        "tables": build_tables(per_seed, study.spec),
        "per_seed": per_seed,
    }
    result["targets"] = check_targets(result["tables"])
    result["seconds"] = time.perf_counter() - t_start
    result["plots"] = plots(result, out)
    result = json_safe(result)
    write_report(result, out)
    return result
