"""What a scaling sweep shows: the markdown report, the PNG, result.json.

`write_report` writes out_dir/report.md and out_dir/result.json; the CLI prints the report and
then the result as one JSON object on its last line (as `paper-tables` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from experts.paper.report import _fmt, _fmt_gain, _fmt_ne, recipe_text

PLOT = "scaling.png"


def _fit_cell(f: dict[str, Any]) -> str:
    if "error" in f:
        return f"n/a ({f['error']})"
    return f"b = {f['b']:.3f}, c = {f['c']:.4f}, a = {f['a']:.3g}, R² = {f['r2']:.3f}"


def markdown(result: dict[str, Any]) -> str:
    """The report of a JSON-safe `scaling.run` result."""
    plan = result["plan"]
    lines = [
        f"# FM scaling: {result['data']}",
        "",
        f"Seeds {result['seeds']}; {result['events']:,} events, {result['users']:,} users; "
        f"wall {result['seconds']:.0f}s. Each size trains by one recipe: "
        f"{recipe_text(plan['recipe'])}, {plan['epochs']} pass(es) over "
        f"the FM window, batch {plan['fm_batch_requests']} requests"
        + (f", at most {plan['fm_max_steps']} steps" if plan["fm_max_steps"] else "") + ".",
        f"NE (lower is better) on the evaluation window {result['windows']['eval'][0]} .. "
        f"{result['windows']['eval'][1]}: the FM's own head, and the +TAE expert (trained on the "
        "expert window) fed by that FM's TAEs. FM NE (expert window): the FM's head on the "
        "window right after its own training window, which it never saw either. FLOPs = FM "
        "encoder multiply-adds per candidate with a full history. Cells: mean ± std over seeds.",
        "",
        "## NE per size",
        "",
        "| surface | task | size | d | layers | history | item table | dropout | FLOPs | params "
        "| FM NE | FM NE (expert window) | expert NE | no-FM expert NE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['surface']} | {r['task']} | {r['size']} | {r['d_model']} | {r['n_layers']} | "
            f"{r['max_history']} | {r.get('item_dim') or r['d_model']} | {r.get('dropout', 0.0):g} | "
            f"{r['flops']:,} | {r['params']:,} | {_fmt_ne(r['fm_ne'])} | "
            f"{_fmt_ne(r.get('fm_next_ne') or {})} | {_fmt_ne(r['expert_ne'])} | "
            f"{_fmt_ne(r['nofm_ne'])} |")
    lines += ["", "## Fit NE(C) = a·C^(-b) + c over the sizes' mean NE", "",
              "| surface | task | model | fit |", "|---|---|---|---|"]
    lines += [f"| {f['surface']} | {f['task']} | {f['model']} | {_fit_cell(f)} |"
              for f in result["fits"]]
    lines += [
        "", "## Transfer Ratio between sizes", "",
        f"FM gain = NE_FM(smaller) - NE_FM(larger) per seed, judged by {result['judge']}. TR = "
        "(NE_exp(smaller) - NE_exp(larger)) / (NE_FM(smaller) - NE_FM(larger)), shown only where "
        f"the larger FM is clearly better, else {result['tr_na']}.", "",
        "| surface | task | sizes | FM NE diff % | FM gain (larger better?) | expert NE diff % "
        "| TR |", "|---|---|---|---|---|---|---|",
    ]
    for t in result["transfers"]:
        tr = _fmt(t["tr"]) if t["fm_improved"] else t["tr_status"]
        lines.append(f"| {t['surface']} | {t['task']} | {t['small']} -> {t['large']} | "
                     f"{_fmt(t['fm_ne_diff'])} | {_fmt_gain(t['fm_gain'])} | "
                     f"{_fmt(t['expert_ne_diff'])} | {tr} |")
    lines += ["", "Plot: " + ", ".join(result["plots"]), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> str:
    """out_dir/scaling.png: FM NE (evaluation and expert window) and expert NE against FLOPs
    (log x), one panel each, one line per surface and task, error bars = std over seeds.
    Returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    keys = sorted({(r["surface"], r["task"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    panels = ((axes[0], "fm_ne", "FM head, eval window"),
              (axes[1], "fm_next_ne", "FM head, expert window"),
              (axes[2], "expert_ne", "+TAE expert, eval window"))
    for ax, model, title in panels:
        for surface, task in keys:
            rows = [r for r in result["rows"] if (r["surface"], r["task"]) == (surface, task)
                    and (r.get(model) or {}).get("mean") is not None]
            label = task if len(result["surfaces"]) == 1 else f"{surface}/{task}"
            line = ax.errorbar([r["flops"] for r in rows], [r[model]["mean"] for r in rows],
                               yerr=[r[model]["std"] for r in rows], marker="o", capsize=3,
                               label=label)
            fit = next((f for f in result["fits"] if (f["surface"], f["task"], f["model"])
                        == (surface, task, model.removesuffix("_ne")) and "error" not in f), None)
            if fit is not None and rows:  # the fitted NE(C) = a C^-b + c, dotted
                xs = np.geomspace(rows[0]["flops"], rows[-1]["flops"], 50)
                ax.plot(xs, fit["a"] * xs ** -fit["b"] + fit["c"], ls=":", lw=1,
                        color=line[0].get_color())
            nofm = rows[0]["nofm_ne"]["mean"] if rows else None
            if model == "expert_ne" and nofm is not None:  # the floor the TAE must beat
                ax.axhline(nofm, ls="--", lw=0.8, color=line[0].get_color(),
                           label=f"{label}: no-FM expert")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels would overlap
        ax.set_xlabel("FM multiply-adds per candidate (log scale)")
        ax.set_ylabel("NE (lower is better)")
        ax.set_title(f"{title} (dotted: fit)", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"FM scaling on {result['data']} (seeds {result['seeds']})")
    fig.tight_layout()
    fig.savefig(out_dir / PLOT, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return PLOT


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    """Write out_dir/report.md and out_dir/result.json of a JSON-safe `result`."""
    (out_dir / "report.md").write_text(markdown(result))
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
