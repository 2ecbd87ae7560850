"""What a paper-tables run shows: the markdown report, the PNG plots, the JSON result.

`write_report` writes out_dir/report.md and out_dir/result.json (strict JSON: NaN and inf become
null); the CLI prints the report and then the result as one JSON object on its last line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from experts.paper.stats import JUDGE, TABLE1_VARIANTS, TR_NA

LABELS = {"ue": "+UE", "tae": "+TAE", "ue_tae": "+UE+TAE", "tae_small": "+TAE(small)"}
WORSE = " ✗"  # marks an NE >= 1: worse than the base rate (a failing target, see Targets)


def _fmt(s: dict[str, Any] | None, digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}"


def _worse(s: dict[str, Any] | None) -> bool:
    """An NE cell whose mean over seeds is >= 1."""
    return bool(s) and s.get("mean") is not None and s["mean"] >= 1.0


def _fmt_ne(s: dict[str, Any]) -> str:
    if s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.4f} ± {s['std']:.4f}" + (WORSE if _worse(s) else "")


def _ne_diff_rows(rows: list[dict]) -> list[str]:
    """Tables 1 and 3 share a layout: NE of no-FM, then each variant's NE diff (marked when
    the variant's own NE is >= 1)."""
    return [f"| {r['surface']} | {r['task']} | {_fmt_ne(r['ne_nofm'])} | "
            + " | ".join(_fmt(r[v]) + (WORSE if _worse(r.get("ne", {}).get(v)) else "")
                         for v in TABLE1_VARIANTS) + " |" for r in rows]


def _fmt_gain(g: dict[str, Any], digits: int = 4) -> str:
    """A paired gain: mean, its one-sided 95% lower bound, and the verdict."""
    if g.get("mean") is None:
        return "n/a"
    if g.get("lower") is None:
        return f"{g['mean']:+.{digits}f} (1 seed: no)"
    return f"{g['mean']:+.{digits}f} (lower {g['lower']:+.{digits}f}: " + (
        "yes)" if g["clear"] else "no)")


def _table2_rows(rows: list[dict]) -> list[str]:
    return [
        f"| {r['surface']} | {r['task']} | {_fmt_ne(r['fm_ne_small'])} | "
        f"{_fmt_ne(r['fm_ne_large'])} | {_fmt_ne(r['fm_ne_ue'])} | {_fmt(r['fm_ne_diff'])} | "
        f"{_fmt_gain(r['fm_gain'])} | {_fmt(r['expert_ne_diff'])} | "
        f"{_fmt(r['tr']) if r['fm_improved'] else TR_NA} |"
        for r in rows
    ]


def _floor_note(floor: dict[str, Any] | None) -> str:
    """Why a row may not get below 1: the eval window's positives and what its base rate
    shift alone costs (`stats.base_rate_floor`)."""
    if not floor:
        return ""
    ne = floor.get("ne")
    shift = (f"; the training window's rate alone scores {ne:.4f}"
             if ne is not None and math.isfinite(ne) else "")
    return f" ({floor['positives']} positives in the eval window{shift})"


def _targets(targets: dict[str, Any]) -> list[str]:
    lines = [
        "", "## Targets", "",
        f"Each row is judged on its per-seed differences, paired by seed ({JUDGE}); "
        "\"meeting\" = clear by that test, \"leaning\" = the mean difference points the "
        "right way but is not clear. A target is met when most rows meet it (NE < 1: every "
        f"row). TR counts only where the large FM is better; elsewhere it is {TR_NA}.", "",
        "| target | rows meeting it | leaning | met |", "|---|---|---|---|",
    ]
    for tgt in targets.values():
        lines.append(f"| {tgt['rule']} | {tgt['meeting']} of {tgt['rows']} | {tgt['leaning']} "
                     f"| {'yes' if tgt['met'] else 'no'} |")
    failing = targets.get("ne_below_base_rate", {}).get("failing", [])
    if failing:
        lines += ["", f"Failing: NE >= 1, worse than the base rate ({WORSE.strip()} in the "
                  "tables):", ""]
        lines += [f"- table {c['table']}: {c['surface']} / {c['task']}, {c['model']}: "
                  f"NE {c['ne']:.4f}{_floor_note(c.get('floor'))}" for c in failing]
    return lines


def recipe_text(recipe: dict[str, Any]) -> str:
    """The ladder's recipe (`experts.paper.ladder`, as saved in result.json) in words."""
    # results saved before the law's constants were recorded used 32 and 1.6
    lr, ref, power = recipe["lr_base"], recipe.get("lr_width_ref", 32), recipe.get(
        "lr_width_power", 1.6)
    return (f"linear warm-up over {recipe['warmup_steps']} steps, {recipe['lr_decay']} decay to "
            f"{recipe['min_lr_frac']:.0%} of a peak lr of min({lr:g}, {lr:g}·({ref}/d)^{power:g})")


def _fm_sizes(plan: dict[str, Any] | None) -> list[str]:
    """One line naming the two FMs and the recipe they train by (none for an old result)."""
    if not plan:
        return []
    small, large = (f"{s['name']} (d={s['d_model']}, {s['n_layers']} layers, history "
                    f"{s['max_history']})" for s in plan["fm_sizes"])
    steps = (f"at most {plan['fm_max_steps']} steps" if plan["fm_max_steps"]
             else "one pass over the FM window")
    holdout = plan["expert"]["holdout_frac"]
    stop = (f" Experts stop early on the latest {holdout:.0%} of their training window."
            if holdout else "")
    return [f"FM small = {small}, FM large = {large}: two rungs of the scaling ladder, each "
            f"trained by its recipe ({recipe_text(plan['recipe'])}), {steps}, "
            f"batch {plan['fm_batch_requests']} requests.{stop}", ""]


def markdown(result: dict[str, Any]) -> str:
    """The report of a JSON-safe result (see `json_safe`): the four tables and the targets."""
    t = result["tables"]
    lines = [
        f"# Paper tables: {result['data']}",
        "",
        f"Seeds {result['seeds']}; cells are mean ± std over seeds (sample std). NE diff is the "
        "relative change in %, (NE_variant - NE_ref) / NE_ref * 100: negative = better. "
        f"Experts judged on {result['windows']['eval'][0]} .. {result['windows']['eval'][1]}; "
        f"{result['events']:,} events, {result['users']:,} users; wall {result['seconds']:.0f}s.",
        "Embeddings are computed in memory at each impression's own time from history strictly "
        "before it (point-in-time by construction; no feature store involved). "
        f"{WORSE.strip()} = NE >= 1, worse than the base rate.",
        "",
        "## 1. NE diff (%) vs the no-FM expert",
        "",
        "| surface | task | NE no-FM | +UE | +TAE | +UE+TAE |",
        "|---|---|---|---|---|---|",
    ]
    lines += _ne_diff_rows(t["table1_ne_diff_vs_nofm"])
    lines += [
        "", "## 2. FM small -> FM large", "",
        *_fm_sizes(result.get("plan")),
        "FM NE on the expert's surface and evaluation window; expert = +TAE expert on each "
        "version. TR = (NE_exp(small) - NE_exp(large)) / (NE_FM(small) - NE_FM(large)), mean "
        "± std of the per-seed TRs, shown only where the large FM is better: FM gain = "
        "NE_FM(small) - NE_FM(large) per seed, paired, with its one-sided 95% lower bound.",
        "",
        "| surface | task | FM NE small | FM NE large | UE-model NE | FM NE diff % "
        "| FM gain (large better?) | expert NE diff % | TR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _table2_rows(t["table2_fm_small_vs_large"])
    lines += ["", "## 3. Unseen tasks (never shown to the FM): NE diff (%) vs no-FM", "",
              "| surface | task | NE no-FM | +UE | +TAE | +UE+TAE |", "|---|---|---|---|---|---|"]
    lines += _ne_diff_rows(t["table3_unseen_tasks"])
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
    lines += _targets(result["targets"])
    lines += ["", "Plots: " + ", ".join(result["plots"]), ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the tables' PNG plots into out_dir; returns their file names."""
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


def json_safe(x: Any) -> Any:
    """A copy of `x` that strict JSON can hold: NaN/inf -> None, numpy scalars -> Python,
    tuples -> lists, dict keys -> str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    """Write out_dir/report.md and out_dir/result.json of a JSON-safe `result`."""
    (out_dir / "report.md").write_text(markdown(result))
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
