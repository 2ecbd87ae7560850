"""From per-seed numbers to the paper's tables, and the targets judged on them.

NE diff = relative NE change in %, (NE_variant - NE_ref) / NE_ref * 100; negative is better.
Each cell is {"mean", "std" (sample std over seeds), "n" (seeds with a finite value)}.

Tables:
  1. +UE, +TAE, +UE+TAE vs the no-FM expert, per surface and task (tasks the FM trains on);
  2. FM small -> large: the FM's NE diff on that surface and task, the expert's NE diff
     (expert on TAE-large vs on TAE-small) and the Transfer Ratio;
  3. unseen tasks (never shown to the FM): NE diff of each FM variant vs no-FM;
  4. per surface: FLOPs per candidate of the expert (+TAE) vs the one-stage model, and the
     mean NE over the surface's tasks of no-FM, expert and one-stage.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from experts.metrics import transfer_ratio
from store_bridge.events.schema import DatasetSpec

TABLE1_VARIANTS = ("ue", "tae", "ue_tae")
TABLE_KEYS = ("table1_ne_diff_vs_nofm", "table2_fm_small_vs_large", "table3_unseen_tasks",
              "table4_flops")


def ne_diff_pct(new: float, ref: float) -> float:
    """(new - ref) / ref in %; nan where ref is 0, nan or infinite."""
    return (new - ref) / ref * 100.0 if ref and math.isfinite(ref) else float("nan")


def mean_std(values: list[float]) -> dict[str, float | None]:
    """{"mean", "std", "n"} over the finite values (sample std; 0.0 from one value, None
    for both from none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(len(v))}


def build_tables(per_seed: list[dict[str, Any]], spec: DatasetSpec) -> dict[str, list[dict]]:
    """The four tables (keys TABLE_KEYS) from `runs.run_seed`'s results, one per seed."""
    unseen = set(spec.unseen_tasks)
    t1, t2, t3, t4 = [], [], [], []
    for surface, first in per_seed[0]["surfaces"].items():
        seeds = [s["surfaces"][surface] for s in per_seed]
        for task in first["tasks"]:
            base = [s["expert_ne"]["nofm"][task] for s in seeds]
            row: dict[str, Any] = {"surface": surface, "task": task, "ne_nofm": mean_std(base)}
            for v in TABLE1_VARIANTS:
                row[v] = mean_std([ne_diff_pct(s["expert_ne"][v][task], b)
                                   for s, b in zip(seeds, base, strict=True)])
            (t3 if task in unseen else t1).append(row)
            if task not in unseen:
                t2.append(_transfer_row(surface, task, seeds))
        t4.append(_compute_row(surface, first, seeds))
    return dict(zip(TABLE_KEYS, (t1, t2, t3, t4), strict=True))


def _transfer_row(surface: str, task: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 2's row: FM small -> large on one surface and task, over seeds."""
    fm_diff, ex_diff, tr = [], [], []
    for s in seeds:
        f1, f2 = s["fm_ne"]["tae_small"].get(task), s["fm_ne"]["tae"].get(task)
        e1, e2 = s["expert_ne"]["tae_small"][task], s["expert_ne"]["tae"][task]
        f1 = float("nan") if f1 is None else f1
        f2 = float("nan") if f2 is None else f2
        fm_diff.append(ne_diff_pct(f2, f1))
        ex_diff.append(ne_diff_pct(e2, e1))
        tr.append(transfer_ratio(e1, e2, f1, f2))
    return {
        "surface": surface, "task": task,
        "fm_ne_small": mean_std([s["fm_ne"]["tae_small"].get(task, math.nan) for s in seeds]),
        "fm_ne_large": mean_std([s["fm_ne"]["tae"].get(task, math.nan) for s in seeds]),
        "fm_ne_ue": mean_std([s["fm_ne"]["ue"].get(task, math.nan) for s in seeds]),
        "fm_ne_diff": mean_std(fm_diff), "expert_ne_diff": mean_std(ex_diff),
        "tr": mean_std(tr),
    }


def _compute_row(surface: str, first: dict[str, Any], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 4's row: FLOPs (the same every seed: taken from the first) and mean NE."""
    mean_ne = {
        v: mean_std([float(np.nanmean(list(s["expert_ne"][v].values()))) for s in seeds])
        for v in ("nofm", "tae", "one_stage")
    }
    fl_e, fl_o = first["flops"]["tae"], first["flops"]["one_stage"]
    return {
        "surface": surface,
        "expert_flops": fl_e, "one_stage_flops": fl_o, "flops_ratio": fl_e / fl_o,
        "nofm_flops": first["flops"]["nofm"],
        "expert_params": first["params"]["tae"], "one_stage_params": first["params"]["one_stage"],
        "mean_ne_nofm": mean_ne["nofm"], "mean_ne_expert": mean_ne["tae"],
        "mean_ne_one_stage": mean_ne["one_stage"],
    }


def _mean(stat: dict[str, Any]) -> float:
    return math.nan if stat.get("mean") is None else float(stat["mean"])


def _spread(*stats: dict[str, Any]) -> float:
    """The larger std over seeds of the stats compared; infinite from a single seed, which
    shows no spread, so that nothing counts as clear of it."""
    if any((s.get("n") or 0) < 2 for s in stats):
        return math.inf
    return max(float(s["std"] or 0.0) for s in stats)


def check_targets(tables: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """The issue's four targets, judged on the tables' means over seeds. Each says how many
    rows (surface and task, where there are numbers; surfaces for FLOPs) meet it, `met` when
    most do, and `clear`: how many meet it by more than the spread over seeds (the larger std
    of the terms compared; nothing is clear from one seed)."""
    t1, t2, t3, t4 = (tables[k] for k in TABLE_KEYS)

    def summary(rows: list[bool], clear: list[bool], rule: str) -> dict[str, Any]:
        return {"rule": rule, "rows": len(rows), "meeting": int(sum(rows)),
                "clear": int(sum(clear)), "met": bool(rows) and sum(rows) > len(rows) / 2}

    def judged(rows: list[dict], *keys: str) -> list[dict]:
        """Rows with numbers to compare (a task without positives in a window has none)."""
        return [r for r in rows if all(math.isfinite(_mean(r[k])) for k in keys)]

    t1, t2, t3 = judged(t1, "ue", "tae"), judged(t2, "tr"), judged(t3, "tae")
    tae_vs_ue = [_mean(r["tae"]) < _mean(r["ue"]) for r in t1]
    tae_vs_ue_clear = [
        _mean(r["ue"]) - _mean(r["tae"]) > _spread(r["tae"], r["ue"])
        for r in t1
    ]
    tr = [_mean(r["tr"]) >= 0.6 for r in t2]
    tr_clear = [_mean(r["tr"]) - _spread(r["tr"]) >= 0.6 for r in t2]
    unseen = [_mean(r["tae"]) < 0 for r in t3]
    unseen_clear = [_mean(r["tae"]) + _spread(r["tae"]) < 0 for r in t3]
    # Equal NE: the expert is at least as good as the one-stage model on the surface's mean NE
    # (a better expert at lower cost meets it a fortiori).
    flops = [
        r["flops_ratio"] <= 0.4 and _mean(r["mean_ne_expert"]) <= _mean(r["mean_ne_one_stage"])
        for r in t4
    ]
    flops_clear = [
        r["flops_ratio"] <= 0.4
        and _mean(r["mean_ne_one_stage"]) - _mean(r["mean_ne_expert"])
        > _spread(r["mean_ne_expert"], r["mean_ne_one_stage"])
        for r in t4
    ]
    return {
        "tae_beats_ue": summary(tae_vs_ue, tae_vs_ue_clear, "+TAE NE diff below +UE's"),
        "transfer_ratio": summary(tr, tr_clear, "TR (FM small -> large) >= 0.6"),
        "unseen_gain": summary(unseen, unseen_clear, "+TAE NE diff < 0 on tasks the FM never saw"),
        "expert_flops": summary(
            flops, flops_clear, "expert FLOPs <= 40% of the one-stage's, expert NE <= one-stage NE"
        ),
    }
