"""The paper's offline tables, computed in memory on one dataset over several seeds.

Per seed: a small and a large FM and the UE model (the large FM's size, candidate-free) train
on the first 60% of the log in one streaming pass; per chosen surface, every expert variant of
`experts.baselines` trains on the next 20% and is judged on the last 20% (NE per task).

Point-in-time correctness without the store: each impression's TAE (and UE) is computed by the
FM from that user's events strictly before the impression's own timestamp (`TAEEngine` /
`compute_user_embeddings` read `UserHistories.lookup`, which excludes the request's own time),
i.e. the value that logging at serving time would have written and that the store's
point-in-time join would return. No Feast or Redis is needed.

Tables (NE diff = relative NE change in %, (NE_variant - NE_ref) / NE_ref * 100; negative is
better), each cell mean and std over seeds:
  1. +UE, +TAE, +UE+TAE vs the no-FM expert, per surface and task (tasks the FM trains on);
  2. FM small -> large: the FM's NE diff on that surface and task, the expert's NE diff
     (expert on TAE-large vs on TAE-small) and the Transfer Ratio;
  3. unseen tasks (never shown to the FM): NE diff of each FM variant vs no-FM;
  4. per surface: FLOPs per candidate of the expert (+TAE) vs the one-stage model, and the
     mean NE over the surface's tasks of no-FM, expert and one-stage.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from experts.baselines import (
    ONE_STAGE_HISTORY,
    ExpertSize,
    VariantResult,
    base_frame,
    train_variant,
)
from experts.metrics import transfer_ratio
from fm import FMConfig, TAEEngine, UserHistories, train_streaming
from fm.batching import Requests
from fm.metrics import NEAccumulator
from fm.model import FoundationModel
from fm.user_embedding import compute_user_embeddings, train_ue_streaming
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, time_windows, timestamps_us

DATASETS = ("synthetic", "kuairand", "movielens")
TABLE1_VARIANTS = ("ue", "tae", "ue_tae")
LABELS = {"ue": "+UE", "tae": "+TAE", "ue_tae": "+UE+TAE", "tae_small": "+TAE(small)"}


# ---- data and sizing --------------------------------------------------------------------------


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
    """Scale data and steps so a run takes at most about `budget_s` on 2 shared CPU cores.

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


class DataError(ValueError):
    """The dataset named for a run is missing or not in the format its loader reads."""


def load_data(
    data: str, data_path: str | Path | None, plan: Plan
) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    try:
        return _load_data(data, data_path, plan)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from e


def _load_data(
    data: str, data_path: str | Path | None, plan: Plan
) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    if data == "synthetic":
        from store_bridge.events.synthetic import SyntheticConfig, generate

        n_users = plan.max_users or 1000
        cfg = SyntheticConfig(n_users=n_users, n_items=max(100, n_users // 2), days=21)
        events, items, spec = generate(cfg)
        return events, items, spec
    if data_path is None:
        raise ValueError(f"--data {data} needs --data-path")
    if data == "kuairand":
        from store_bridge.events.kuairand import load_kuairand

        events, items, spec, _ = load_kuairand(Path(data_path))
    elif data == "movielens":
        from store_bridge.events.movielens import load_movielens

        events, items, spec = load_movielens(Path(data_path))
    else:
        raise ValueError(f"unknown data {data!r}; choose from {DATASETS}")
    if plan.max_users is not None and events["user_id"].nunique() > plan.max_users:
        users = np.sort(events["user_id"].unique())
        keep = np.random.default_rng(0).choice(users, plan.max_users, replace=False)
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    return events, items, spec


def choose_surfaces(events: pd.DataFrame, spec: DatasetSpec, data: str, k: int) -> list[str]:
    """synthetic: feed; otherwise the k surfaces with the most events."""
    if data == "synthetic":
        return ["feed"]
    counts = events["surface"].value_counts()
    return [s for s in counts.index[:k] if s in spec.surfaces]


# ---- per-seed work ----------------------------------------------------------------------------


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


def _rows_vectors(
    rows: pd.DataFrame, engines: dict[str, TAEEngine], ue_model: Any, histories: UserHistories
) -> dict[str, np.ndarray]:
    """TAE (each FM) and UE of every row, as of the row's own time."""
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


def run_seed(
    seed: int,
    events: pd.DataFrame,
    items: pd.DataFrame,
    spec: DatasetSpec,
    surfaces: list[str],
    plan: Plan,
    *,
    say: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """One seed: FMs, UE model, every variant per surface -> raw NE/FLOPs numbers."""
    windows = time_windows(events)
    fm_end = windows["fm"][1]
    split = windows["eval"][0]
    fm_kw = dict(
        **spec.fm_fields(),
        max_history=plan.fm_max_history,
        batch_requests=plan.fm_batch_requests,
        seed=seed,
    )
    cfgs = {"tae_small": FMConfig.small(**fm_kw), "tae": FMConfig.large(**fm_kw)}
    models: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        res = train_streaming(events, cfg, end=fm_end, max_steps=plan.fm_max_steps,
                              progress=progress)
        models[name] = res.model
        say(f"  seed {seed}: FM {name} {res.steps} steps in {res.seconds:.1f}s")
    res = train_ue_streaming(events, cfgs["tae"], end=fm_end, max_steps=plan.fm_max_steps,
                             progress=progress)
    models["ue"] = res.model
    say(f"  seed {seed}: UE model {res.steps} steps in {res.seconds:.1f}s")

    histories = UserHistories.from_events(events, spec.surfaces)
    engines = {n: TAEEngine(models[n], histories) for n in ("tae_small", "tae")}
    out: dict[str, Any] = {"surfaces": {}}
    for surface in surfaces:
        tasks = [t for t in spec.surface_tasks[surface] if t in events.columns]
        rows = events[(events["surface"] == surface) & (events[EVENT_TIMESTAMP] >= fm_end)]
        rows = rows.reset_index(drop=True)
        is_test = (rows[EVENT_TIMESTAMP] >= split).to_numpy()
        test_rows = rows[is_test]
        fm_ne = {n: fm_ne_on_rows(models[n], histories, test_rows) for n in models}
        vectors = _rows_vectors(rows, engines, models["ue"], histories)
        hist_len = plan.expert.history_length * ONE_STAGE_HISTORY  # the one-stage's history
        frame = base_frame(rows, events, items, tasks, hist_len)
        train, test = frame[~is_test], frame[is_test]
        size = plan.expert.for_rows(len(train))
        v_tr = {k: v[~is_test] for k, v in vectors.items()}
        v_te = {k: v[is_test] for k, v in vectors.items()}
        results: dict[str, VariantResult] = {}
        t0 = time.perf_counter()
        for variant in ("nofm", "ue", "tae_small", "tae", "ue_tae", "one_stage"):
            results[variant] = train_variant(
                variant, train, test, v_tr, v_te, surface=surface, tasks=tasks,
                size=size, seed=seed, n_items=spec.n_items,
                n_categories=max(spec.n_categories, 1), n_actions=spec.n_actions,
                progress=progress,
            )
        say(f"  seed {seed}: {surface}: {len(train):,} train / {len(test):,} test rows, "
            f"{size.epochs} epochs, 6 experts in {time.perf_counter() - t0:.1f}s")
        out["surfaces"][surface] = {
            "tasks": tasks,
            "fm_ne": fm_ne,
            "expert_ne": {k: r.ne for k, r in results.items()},
            "flops": {k: r.flops for k, r in results.items()},
            "params": {k: r.params for k, r in results.items()},
            "rows": {"train": int(len(train)), "test": int(len(test))},
        }
    return out


# ---- aggregation ------------------------------------------------------------------------------


def _pct(new: float, ref: float) -> float:
    return (new - ref) / ref * 100.0 if ref and math.isfinite(ref) else float("nan")


def _stat(values: list[float]) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(len(v))}


def build_tables(per_seed: list[dict[str, Any]], spec: DatasetSpec) -> dict[str, list[dict]]:
    unseen = set(spec.unseen_tasks)
    t1, t2, t3, t4 = [], [], [], []
    for surface, first in per_seed[0]["surfaces"].items():
        seeds = [s["surfaces"][surface] for s in per_seed]
        for task in first["tasks"]:
            base = [s["expert_ne"]["nofm"][task] for s in seeds]
            row: dict[str, Any] = {"surface": surface, "task": task, "ne_nofm": _stat(base)}
            for v in TABLE1_VARIANTS:
                row[v] = _stat([_pct(s["expert_ne"][v][task], b) for s, b in zip(seeds, base, strict=True)])
            (t3 if task in unseen else t1).append(row)
            if task in unseen:
                continue
            fm_diff, ex_diff, tr = [], [], []
            for s in seeds:
                f1, f2 = s["fm_ne"]["tae_small"].get(task), s["fm_ne"]["tae"].get(task)
                e1, e2 = s["expert_ne"]["tae_small"][task], s["expert_ne"]["tae"][task]
                f1 = float("nan") if f1 is None else f1
                f2 = float("nan") if f2 is None else f2
                fm_diff.append(_pct(f2, f1))
                ex_diff.append(_pct(e2, e1))
                tr.append(transfer_ratio(e1, e2, f1, f2))
            t2.append({
                "surface": surface, "task": task,
                "fm_ne_small": _stat([s["fm_ne"]["tae_small"].get(task, math.nan) for s in seeds]),
                "fm_ne_large": _stat([s["fm_ne"]["tae"].get(task, math.nan) for s in seeds]),
                "fm_ne_ue": _stat([s["fm_ne"]["ue"].get(task, math.nan) for s in seeds]),
                "fm_ne_diff": _stat(fm_diff), "expert_ne_diff": _stat(ex_diff),
                "tr": _stat(tr),
            })
        mean_ne = {
            v: _stat([float(np.nanmean(list(s["expert_ne"][v].values()))) for s in seeds])
            for v in ("nofm", "tae", "one_stage")
        }
        fl_e, fl_o = first["flops"]["tae"], first["flops"]["one_stage"]
        t4.append({
            "surface": surface,
            "expert_flops": fl_e, "one_stage_flops": fl_o, "flops_ratio": fl_e / fl_o,
            "nofm_flops": first["flops"]["nofm"],
            "expert_params": first["params"]["tae"], "one_stage_params": first["params"]["one_stage"],
            "mean_ne_nofm": mean_ne["nofm"], "mean_ne_expert": mean_ne["tae"],
            "mean_ne_one_stage": mean_ne["one_stage"],
        })
    return {"table1_ne_diff_vs_nofm": t1, "table2_fm_small_vs_large": t2,
            "table3_unseen_tasks": t3, "table4_flops": t4}


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
    t1, t2, t3, t4 = (tables[k] for k in (
        "table1_ne_diff_vs_nofm", "table2_fm_small_vs_large", "table3_unseen_tasks", "table4_flops"))

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


# ---- report -----------------------------------------------------------------------------------


def _fmt(s: dict[str, Any] | None, digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}"


def _fmt_ne(s: dict[str, Any]) -> str:
    return "n/a" if s.get("mean") is None else f"{s['mean']:.4f} ± {s['std']:.4f}"


def markdown(result: dict[str, Any]) -> str:
    t = result["tables"]
    lines = [
        f"# Paper tables: {result['data']}",
        "",
        f"Seeds {result['seeds']}; cells are mean ± std over seeds (sample std). NE diff is the "
        "relative change in %, (NE_variant - NE_ref) / NE_ref * 100: negative = better. "
        f"Experts judged on {result['windows']['eval'][0]} .. {result['windows']['eval'][1]}; "
        f"{result['events']:,} events, {result['users']:,} users; wall {result['seconds']:.0f}s.",
        "Embeddings are computed in memory at each impression's own time from history strictly "
        "before it (point-in-time by construction; no feature store involved).",
        "",
        "## 1. NE diff (%) vs the no-FM expert",
        "",
        "| surface | task | NE no-FM | +UE | +TAE | +UE+TAE |",
        "|---|---|---|---|---|---|",
    ]
    for r in t["table1_ne_diff_vs_nofm"]:
        lines.append(f"| {r['surface']} | {r['task']} | {_fmt_ne(r['ne_nofm'])} | "
                     + " | ".join(_fmt(r[v]) for v in TABLE1_VARIANTS) + " |")
    lines += [
        "", "## 2. FM small -> FM large", "",
        "FM NE on the expert's surface and evaluation window; expert = +TAE expert on each "
        "version. TR = (NE_exp(small) - NE_exp(large)) / (NE_FM(small) - NE_FM(large)).",
        "",
        "| surface | task | FM NE small | FM NE large | UE-model NE | FM NE diff % "
        "| expert NE diff % | TR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in t["table2_fm_small_vs_large"]:
        lines.append(
            f"| {r['surface']} | {r['task']} | {_fmt_ne(r['fm_ne_small'])} | "
            f"{_fmt_ne(r['fm_ne_large'])} | {_fmt_ne(r['fm_ne_ue'])} | {_fmt(r['fm_ne_diff'])} | "
            f"{_fmt(r['expert_ne_diff'])} | {_fmt(r['tr'])} |"
        )
    lines += ["", "## 3. Unseen tasks (never shown to the FM): NE diff (%) vs no-FM", "",
              "| surface | task | NE no-FM | +UE | +TAE | +UE+TAE |", "|---|---|---|---|---|---|"]
    for r in t["table3_unseen_tasks"]:
        lines.append(f"| {r['surface']} | {r['task']} | {_fmt_ne(r['ne_nofm'])} | "
                     + " | ".join(_fmt(r[v]) for v in TABLE1_VARIANTS) + " |")
    if not t["table3_unseen_tasks"]:
        lines.append("| (no unseen task on the chosen surfaces) | | | | | |")
    lines += [
        "", "## 4. Compute: expert (+TAE) vs one-stage model (no FM)", "",
        "FLOPs = multiply-adds per candidate of the expert network (ExpertModel."
        "flops_per_candidate; the FM's TAE is computed once and shared by all experts, so it is "
        "not counted). Mean NE over the surface's tasks.",
        "",
        "| surface | expert FLOPs | one-stage FLOPs | ratio | NE no-FM | NE expert | "
        "NE one-stage |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in t["table4_flops"]:
        lines.append(
            f"| {r['surface']} | {r['expert_flops']:,} | {r['one_stage_flops']:,} | "
            f"{r['flops_ratio']:.1%} | {_fmt_ne(r['mean_ne_nofm'])} | "
            f"{_fmt_ne(r['mean_ne_expert'])} | {_fmt_ne(r['mean_ne_one_stage'])} |"
        )
    lines += [
        "", "## Targets", "",
        "Judged on the means above; \"clear\" = the gap exceeds the spread over seeds.", "",
        "| target | rows meeting it | clear | met |", "|---|---|---|---|",
    ]
    for tgt in result["targets"].values():
        lines.append(f"| {tgt['rule']} | {tgt['meeting']} of {tgt['rows']} | {tgt['clear']} | "
                     f"{'yes' if tgt['met'] else 'no'} |")
    lines += ["", "Plots: " + ", ".join(result["plots"]), ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["tables"]
    written = []

    def bars(rows: list[dict], title: str, name: str) -> None:
        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
        x = np.arange(len(rows))
        w = 0.8 / len(TABLE1_VARIANTS)
        for i, v in enumerate(TABLE1_VARIANTS):
            m = [r[v]["mean"] if r[v]["mean"] is not None else np.nan for r in rows]
            s = [r[v]["std"] if r[v]["std"] is not None else 0 for r in rows]
            ax.bar(x + (i - 1) * w, m, w, yerr=s, label=LABELS[v], capsize=2)
        ax.set_xticks(x, [f"{r['surface']}\n{r['task']}" for r in rows], fontsize=7)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("NE diff vs no-FM (%)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    if t["table1_ne_diff_vs_nofm"]:
        bars(t["table1_ne_diff_vs_nofm"], "Table 1: NE diff vs no-FM", "table1_ne_diff.png")
    if t["table3_unseen_tasks"]:
        bars(t["table3_unseen_tasks"], "Table 3: unseen tasks", "table3_unseen.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in t["table2_fm_small_vs_large"]:
        if r["fm_ne_diff"]["mean"] is None or r["expert_ne_diff"]["mean"] is None:
            continue
        ax.scatter(r["fm_ne_diff"]["mean"], r["expert_ne_diff"]["mean"])
        ax.annotate(f"{r['surface']}/{r['task']}",
                    (r["fm_ne_diff"]["mean"], r["expert_ne_diff"]["mean"]), fontsize=6)
    ax.axline((0, 0), slope=1, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("FM NE diff small->large (%)")
    ax.set_ylabel("expert NE diff small->large (%)")
    ax.set_title("Table 2: transfer (TR = slope)")
    fig.tight_layout()
    fig.savefig(out_dir / "table2_transfer.png", dpi=100)
    plt.close(fig)
    written.append("table2_transfer.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in t["table4_flops"]:
        for key, label, mk in (("expert", "expert +TAE", "o"), ("one_stage", "one-stage", "s")):
            ne = r[f"mean_ne_{key}"]["mean"]
            if ne is not None:
                ax.scatter(r[f"{key}_flops"], ne, marker=mk, label=f"{r['surface']} {label}")
    ax.set_xscale("log")
    ax.set_xlabel("multiply-adds per candidate")
    ax.set_ylabel("mean NE over tasks")
    ax.set_title("Table 4: compute vs NE")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "table4_flops.png", dpi=100)
    plt.close(fig)
    written.append("table4_flops.png")
    return written


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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
    """Compute the four tables; write out_dir/report.md, result.json and PNG plots."""
    t_start = time.perf_counter()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_for(time_budget_s, len(seeds), data)
    say(f"plan: {plan}")
    events, items, spec = load_data(data, data_path, plan)
    surfaces = choose_surfaces(events, spec, data, plan.max_surfaces)
    windows = time_windows(events)
    say(f"data {data}: {len(events):,} events, {events['user_id'].nunique():,} users, "
        f"surfaces {surfaces}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: one intra-op thread is faster here
    try:
        per_seed = []
        for i, seed in enumerate(seeds):
            say(f"seed {seed} ({i + 1}/{len(seeds)}), {time.perf_counter() - t_start:.0f}s")
            per_seed.append(run_seed(seed, events, items, spec, surfaces, plan, say=say,
                                     progress=progress))
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "data": data,
        "seeds": seeds,
        "surfaces": surfaces,
        "events": int(len(events)),
        "users": int(events["user_id"].nunique()),
        "windows": {k: (a.isoformat(), b.isoformat()) for k, (a, b) in windows.items()},
        "unseen_tasks": list(spec.unseen_tasks),
        "tables": build_tables(per_seed, spec),
        "per_seed": per_seed,
    }
    result["targets"] = check_targets(result["tables"])
    result["seconds"] = time.perf_counter() - t_start
    result["plots"] = plots(result, out)
    result = _clean(result)
    (out / "report.md").write_text(markdown(result))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result
