"""From per-seed numbers to the paper's tables, and the targets judged on them.

NE diff = relative NE change in %, (NE_variant - NE_ref) / NE_ref * 100; negative is better.
Each cell is {"mean", "std" (sample std over seeds), "n" (seeds with a finite value),
"values" (one per seed, in the run's seed order; None where not finite)}: the values keep the
pairing by seed that every judgement below uses.

Tables:
  1. +UE, +TAE, +UE+TAE vs the no-FM expert, per surface and task (tasks the FM trains on);
     `ne` holds every expert variant's own NE;
  2. FM small -> large: the FMs' NE on that surface and task, the expert's NE on each (+TAE)
     and the Transfer Ratio, reported only where the large FM is better (see `transfer_row`);
  3. unseen tasks (never shown to the FM): NE diff of each FM variant vs no-FM;
  4. per surface: FLOPs per candidate of the expert (+TAE) vs the one-stage model, and the
     mean NE over the surface's tasks of no-FM, expert and one-stage.

The judge (`paired_gain`): a claim "A is better than B" is judged on the per-seed differences
d_s = A_s - B_s (oriented so that > 0 is better), paired by seed, never on the difference of
two means over seeds. It holds ("clear") when a one-sided paired t-test at 5% rejects
"no gain": mean(d) - t_{0.95, n-1} * stderr(d) > 0, stderr = std(d, ddof=1) / sqrt(n). With
fewer than two seeds there is no spread, so nothing is clear.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from experts.metrics import normalized_entropy, transfer_ratio
from store_bridge.events.schema import DatasetSpec

TABLE1_VARIANTS = ("ue", "tae", "ue_tae")
TABLE_KEYS = ("table1_ne_diff_vs_nofm", "table2_fm_small_vs_large", "table3_unseen_tasks",
              "table4_flops")
TR_TARGET = 0.6  # the target: TR >= 0.6
FLOPS_TARGET = 0.4  # expert FLOPs <= 40% of the one-stage model's
TR_NA = "n/a (FM did not improve)"
JUDGE = ("one-sided paired t-test over seeds at 5%: a gain holds where "
         "mean(d) - t(0.95, n-1) * stderr(d) > 0, d = per-seed difference")
# Student t quantile t(0.95, df) for df = 1..30; larger df use df 30's (slightly conservative).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
        1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
        1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)


def ne_diff_pct(new: float, ref: float) -> float:
    """(new - ref) / ref in %; nan where ref is 0, nan or infinite."""
    return (new - ref) / ref * 100.0 if ref and math.isfinite(ref) else float("nan")


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """A cell: {"mean", "std", "n"} over the finite values (sample std; 0.0 from one value,
    None for both from none) and "values": one per seed, None where not finite."""
    kept = [None if not _finite(x) else float(x) for x in values]
    v = np.asarray([x for x in kept if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0, "values": kept}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(len(v)), "values": kept}


def t95(df: int) -> float:
    """One-sided 95% Student t quantile for `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {df}")
    return _T95[min(df, len(_T95)) - 1]


def paired_gain(better: list[float | None], worse: list[float | None],
                scale: float = 1.0) -> dict[str, Any]:
    """The claim "`better` is above `worse`" judged on the per-seed differences
    d_s = better_s - scale * worse_s over the seeds where both are finite (the lists are
    aligned by seed). Returns {"mean", "stderr", "lower" (one-sided 95% lower bound of the
    mean gain; None from fewer than 2 seeds), "n", "clear" (lower > 0)}.

    Raises ValueError when the lists are not aligned (different lengths)."""
    if len(better) != len(worse):
        raise ValueError(f"paired values need one per seed on both sides: "
                         f"{len(better)} vs {len(worse)}")
    d = np.asarray([b - scale * w for b, w in zip(better, worse, strict=True)
                    if _finite(b) and _finite(w)], dtype=np.float64)
    n = int(len(d))
    if n == 0:
        return {"mean": None, "stderr": None, "lower": None, "n": 0, "clear": False}
    mean = float(d.mean())
    if n < 2:
        return {"mean": mean, "stderr": None, "lower": None, "n": 1, "clear": False}
    stderr = float(d.std(ddof=1) / math.sqrt(n))
    lower = mean - t95(n - 1) * stderr
    return {"mean": mean, "stderr": stderr, "lower": lower, "n": n, "clear": lower > 0}


def _negated(values: list[float | None]) -> list[float | None]:
    return [None if v is None else -v for v in values]


def _constant(c: float, like: list[Any]) -> list[float]:
    return [c] * len(like)


def base_rate_floor(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, Any]:
    """What a model without signal scores when the positive rate moves between windows: the
    NE on the test labels of predicting the training labels' positive rate for every row
    ("ne"; nan without valid labels on either side), and the test window's positives
    ("positives"). 1-D label arrays, NaN = no label. NE >= 1 there is the data's, not a
    model's: no model trained on the earlier window can know the later rate."""
    tr, te = train_labels[~np.isnan(train_labels)], test_labels[~np.isnan(test_labels)]
    positives = int(te.sum())
    if not len(tr) or not len(te):
        return {"ne": math.nan, "positives": positives}
    rate = float(np.clip(tr.mean(), 1e-7, 1 - 1e-7))
    return {"ne": normalized_entropy(te, np.full(len(te), rate)), "positives": positives}


def build_tables(per_seed: list[dict[str, Any]], spec: DatasetSpec) -> dict[str, list[dict]]:
    """The four tables (keys TABLE_KEYS) from `runs.run_seed`'s results, one per seed."""
    unseen = set(spec.unseen_tasks)
    t1, t2, t3, t4 = [], [], [], []
    for surface, first in per_seed[0]["surfaces"].items():
        seeds = [s["surfaces"][surface] for s in per_seed]
        for task in first["tasks"]:
            base = [s["expert_ne"]["nofm"][task] for s in seeds]
            row: dict[str, Any] = {"surface": surface, "task": task, "ne_nofm": mean_std(base),
                                   "floor": first.get("floor", {}).get(task)}
            for v in TABLE1_VARIANTS:
                row[v] = mean_std([ne_diff_pct(s["expert_ne"][v][task], b)
                                   for s, b in zip(seeds, base, strict=True)])
            row["ne"] = {v: mean_std([s["expert_ne"][v][task] for s in seeds])
                         for v in first["expert_ne"]}
            (t3 if task in unseen else t1).append(row)
            if task not in unseen:
                t2.append(transfer_row(surface, task, seeds))
        t4.append(_compute_row(surface, first, seeds))
    return dict(zip(TABLE_KEYS, (t1, t2, t3, t4), strict=True))


def transfer_row(surface: str, task: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 2's row: FM small -> large on one surface and task, over seeds.

    `fm_gain` is `paired_gain(NE_FM(small), NE_FM(large))`; `fm_improved` its "clear". The TR
    (mean ± std of the per-seed TRs) is given only where the large FM improved; elsewhere
    `tr` has no mean and `tr_status` is TR_NA. `seeds`: one `run_surface` result per seed.
    """
    def fm(name: str) -> list[float]:
        return [s["fm_ne"][name].get(task, math.nan) for s in seeds]

    f1, f2, ue = fm("tae_small"), fm("tae"), fm("ue")
    e1 = [s["expert_ne"]["tae_small"][task] for s in seeds]
    e2 = [s["expert_ne"]["tae"][task] for s in seeds]
    row: dict[str, Any] = {
        "surface": surface, "task": task,
        "fm_ne_small": mean_std(f1), "fm_ne_large": mean_std(f2), "fm_ne_ue": mean_std(ue),
        "expert_ne_small": mean_std(e1), "expert_ne_large": mean_std(e2),
        "fm_ne_diff": mean_std([ne_diff_pct(b, a) for a, b in zip(f1, f2, strict=True)]),
        "expert_ne_diff": mean_std([ne_diff_pct(b, a) for a, b in zip(e1, e2, strict=True)]),
    }
    row["fm_gain"] = paired_gain(row["fm_ne_small"]["values"], row["fm_ne_large"]["values"])
    row["fm_improved"] = row["fm_gain"]["clear"]
    if row["fm_improved"]:
        row["tr"] = mean_std([transfer_ratio(*v) for v in zip(e1, e2, f1, f2, strict=True)])
        row["tr_status"] = "reported"
    else:
        row["tr"] = mean_std([])
        row["tr_status"] = TR_NA
    return row


def _compute_row(surface: str, first: dict[str, Any], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 4's row: FLOPs (the same every seed: taken from the first) and mean NE."""
    def mean_over_tasks(ne: dict[str, float]) -> float:
        v = [x for x in ne.values() if _finite(x)]
        return float(np.mean(v)) if v else math.nan

    mean_ne = {v: mean_std([mean_over_tasks(s["expert_ne"][v]) for s in seeds])
               for v in ("nofm", "tae", "one_stage")}
    fl_e, fl_o = first["flops"]["tae"], first["flops"]["one_stage"]
    return {
        "surface": surface,
        "expert_flops": fl_e, "one_stage_flops": fl_o, "flops_ratio": fl_e / fl_o,
        "nofm_flops": first["flops"]["nofm"],
        "expert_params": first["params"]["tae"], "one_stage_params": first["params"]["one_stage"],
        "mean_ne_nofm": mean_ne["nofm"], "mean_ne_expert": mean_ne["tae"],
        "mean_ne_one_stage": mean_ne["one_stage"],
    }


# ---- the targets ------------------------------------------------------------------------


def _judged(rule: str, rows: list[dict[str, Any]], *, every: bool = False) -> dict[str, Any]:
    """A target's summary over its judged rows (each with "gain", "eligible", "meets"): how
    many meet it (clear by the paired test), how many only lean its way (eligible, mean gain
    > 0, not clear), and
    `met`: most rows meet it (every row where `every`); never met without rows."""
    meeting = sum(r["meets"] for r in rows)
    leaning = sum(r["eligible"] and not r["meets"] and (r["gain"]["mean"] or 0.0) > 0
                  for r in rows)
    met = bool(rows) and (meeting == len(rows) if every else meeting > len(rows) / 2)
    return {"rule": rule, "test": JUDGE, "rows": len(rows), "meeting": int(meeting),
            "leaning": int(leaning), "met": met, "judged": rows}


def _where(row: dict[str, Any]) -> dict[str, Any]:
    return {"surface": row["surface"], "task": row.get("task", "mean over tasks")}


def ne_cells(tables: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every NE (not NE diff) cell of the tables with numbers: {"table", "surface", "task",
    "model", "cell"}; a (surface, task, model) shown in two tables is listed once."""
    seen: set[tuple[str, str, str]] = set()
    out: list[dict[str, Any]] = []

    def add(table: str, row: dict[str, Any], model: str, cell: dict[str, Any]) -> None:
        key = (row["surface"], _where(row)["task"], model)
        if cell.get("mean") is not None and key not in seen:
            seen.add(key)
            out.append({"table": table, **_where(row), "model": model, "cell": cell})

    t1, t2, t3, t4 = (tables[k] for k in TABLE_KEYS)
    for table, rows in (("1", t1), ("3", t3)):
        for r in rows:
            add(table, r, "expert nofm", r["ne_nofm"])
            for v, cell in r.get("ne", {}).items():
                add(table, r, f"expert {v}", cell)
    for r in t2:
        add("2", r, "FM small", r["fm_ne_small"])
        add("2", r, "FM large", r["fm_ne_large"])
        add("2", r, "UE model", r["fm_ne_ue"])
    for r in t4:
        for key, model in (("mean_ne_nofm", "expert nofm"), ("mean_ne_expert", "expert tae"),
                           ("mean_ne_one_stage", "expert one_stage")):
            add("4", r, model, r[key])
    return out


def check_targets(tables: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each judged per row on paired per-seed differences (`paired_gain`;
    see the module docstring). Each target: rule, test, rows (rows with numbers), meeting
    (clear by the paired test), leaning (mean gain > 0 but not clear), met, and `judged`: one
    entry per row with its `gain` and `meets`.

    tae_beats_ue     d = NE diff(+UE) - NE diff(+TAE), % points vs no-FM (table 1);
    transfer_ratio   only rows whose large FM improved (table 2's `fm_improved`) can meet it:
                     d = (NE_exp(small) - NE_exp(large)) - 0.6 * (NE_FM(small) - NE_FM(large)),
                     i.e. TR >= 0.6 with the FM gain > 0; the others are `TR_NA`, never met;
    unseen_gain      d = -NE diff(+TAE) on tasks the FM never saw (table 3);
    expert_flops     FLOPs ratio <= 0.4 and d = NE(one-stage) - NE(expert), mean over tasks;
    ne_below_base_rate  every model's NE < 1: d = 1 - NE, met only if every row meets it;
                     `failing` lists the cells whose mean NE >= 1 (worse than the base rate),
                     each expert cell with its row's `floor` (`base_rate_floor`) where it has one.
    """
    t1, t2, t3, t4 = (tables[k] for k in TABLE_KEYS)

    def row_judgement(row: dict[str, Any], gain: dict[str, Any], eligible: bool = True,
                      **extra: Any) -> dict[str, Any]:
        """`eligible`: the row's other conditions (FM improved, FLOPs ratio) hold."""
        return {**_where(row), **extra, "gain": gain, "eligible": bool(eligible),
                "meets": bool(eligible and gain["clear"])}

    tae_ue = [row_judgement(r, paired_gain(r["ue"]["values"], r["tae"]["values"]))
              for r in t1 if r["ue"]["n"] and r["tae"]["n"]]
    tr_rows = []
    for r in t2:
        if not (r["fm_ne_small"]["n"] and r["fm_ne_large"]["n"]):
            continue  # a task without positives in the window: no numbers to judge
        e_gain = [None if not (_finite(a) and _finite(b)) else a - b for a, b in
                  zip(r["expert_ne_small"]["values"], r["expert_ne_large"]["values"],
                      strict=True)]
        f_gain = [None if not (_finite(a) and _finite(b)) else a - b for a, b in
                  zip(r["fm_ne_small"]["values"], r["fm_ne_large"]["values"], strict=True)]
        # Without a clear FM gain there is no TR to judge (its sign and size mean nothing).
        gain = (paired_gain(e_gain, f_gain, scale=TR_TARGET) if r["fm_improved"]
                else paired_gain([], []))
        tr_rows.append(row_judgement(r, gain, r["fm_improved"], tr_status=r["tr_status"]))
    unseen = [row_judgement(r, paired_gain(_negated(r["tae"]["values"]),
                                           _constant(0.0, r["tae"]["values"])))
              for r in t3 if r["tae"]["n"]]
    flops = [row_judgement(r, paired_gain(r["mean_ne_one_stage"]["values"],
                                          r["mean_ne_expert"]["values"]),
                           r["flops_ratio"] <= FLOPS_TARGET, flops_ratio=r["flops_ratio"])
             for r in t4 if r["mean_ne_expert"]["n"] and r["mean_ne_one_stage"]["n"]]
    base_rate = []
    for c in ne_cells(tables):
        values = c["cell"]["values"]
        gain = paired_gain(_constant(1.0, values), values)
        base_rate.append({"table": c["table"], "surface": c["surface"], "task": c["task"],
                          "model": c["model"], "ne": c["cell"]["mean"], "gain": gain,
                          "eligible": True, "meets": gain["clear"]})
    targets = {
        "tae_beats_ue": _judged("+TAE NE diff below +UE's", tae_ue),
        "transfer_ratio": _judged(
            f"TR (FM small -> large) >= {TR_TARGET}, only where the large FM is better", tr_rows),
        "unseen_gain": _judged("+TAE NE diff < 0 on tasks the FM never saw", unseen),
        "expert_flops": _judged(f"expert FLOPs <= {FLOPS_TARGET:.0%} of the one-stage's, "
                                "expert NE below the one-stage's", flops),
        "ne_below_base_rate": _judged("every model's NE < 1 (NE >= 1: worse than the base rate)",
                                      base_rate, every=True),
    }
    # The floor is the expert windows' (experts train on one, are judged on the next); the FMs
    # train on an earlier window, so their rows get none.
    floors = {(r["surface"], r["task"]): r.get("floor") for r in (*t1, *t3)}
    targets["ne_below_base_rate"]["failing"] = [
        {**{k: c[k] for k in ("table", "surface", "task", "model", "ne")},
         "floor": floors.get((c["surface"], c["task"])) if c["model"].startswith("expert")
         else None}
        for c in base_rate if c["ne"] >= 1.0
    ]
    return targets
