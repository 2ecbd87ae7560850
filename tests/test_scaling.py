"""The scaling sweep: a 2-size tiny sweep end to end, the power-law fit, the TR judge."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from experts.baselines import ExpertSize
from experts.paper import scaling
from experts.paper.ladder import LADDER, FMSize
from experts.paper.scaling import ScalingPlan, fit_power_law, fm_flops_per_candidate
from experts.paper.stats import TR_NA
from fm import FMConfig, FoundationModel, TAEEngine, UserHistories
from fm.batching import Requests
from fm.testing import toy_config_kwargs, toy_events
from fm.train import evaluate_fm, start_heads_at_base_rates

TINY = ScalingPlan(
    sizes=[FMSize("a", 8, 1, 1, 4), FMSize("b", 16, 1, 2, 8)],
    fm_max_steps=4,
    max_users=60,
    expert=ExpertSize(16, 4, 1, 256, min_steps=2, max_epochs=1),
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    result = scaling.run("synthetic", seeds=[0, 1], out_dir=out, say=lambda _: None, plan=TINY)
    return result, out


def test_tiny_sweep_writes_report_json_and_plot(sweep):
    result, out = sweep
    assert json.loads((out / "result.json").read_text()) == result  # strict JSON round trip
    assert (out / "scaling.png").stat().st_size > 0 and result["plots"] == ["scaling.png"]
    report = (out / "report.md").read_text()
    assert "## NE per size" in report and "## Transfer Ratio between sizes" in report
    rows = result["rows"]
    assert {r["size"] for r in rows} == {"a", "b"}
    for r in rows:
        assert r["fm_ne"]["n"] == 2 and len(r["expert_ne"]["values"]) == 2
        assert all(v is None or v > 0 for v in r["fm_ne"]["values"])
        # the FM is also judged on the window right after its own (the expert window)
        assert r["fm_next_ne"]["n"] == 2 and r["fm_next_ne"]["values"] != r["fm_ne"]["values"]
    assert rows[0]["flops"] < rows[1]["flops"]
    assert {f["model"] for f in result["fits"]} == {"fm", "fm_next", "expert"}
    assert "| FM NE | FM NE (expert window) | expert NE |" in report
    # two sizes: one pair (no separate smallest -> largest), and no fit from 2 points
    assert {(t["small"], t["large"]) for t in result["transfers"]} == {("a", "b")}
    assert all("error" in f for f in result["fits"])
    for t in result["transfers"]:
        assert (t["tr"]["mean"] is None) == (not t["fm_improved"])
        if not t["fm_improved"]:
            assert t["tr_status"] == TR_NA
    assert result["per_seed"][0]["sizes"]["a"]["fm_steps"] == 4


def test_fit_recovers_a_known_power_law():
    c = np.logspace(4, 8, 6)
    ne = 2.0 * c ** -0.3 + 0.8
    fit = fit_power_law(c, ne, n_grid=4000)
    assert fit["b"] == pytest.approx(0.3, rel=0.02)
    assert fit["c"] == pytest.approx(0.8, abs=2e-3)
    assert fit["a"] == pytest.approx(2.0, rel=0.1)
    assert fit["r2"] > 0.999


def test_fit_refuses_too_few_points():
    with pytest.raises(ValueError, match=">= 3"):
        fit_power_law([1e3, 1e4], [0.9, 0.8])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1e3, 1e4], [0.9, 0.85, 0.8])


def _per_seed(fm_small, fm_large, exp_small, exp_large):
    def size(fm, exp):
        return {"fm_ne": {"feed": {"like": fm}}, "expert_ne": {"feed": {"like": exp}}}
    return [{"sizes": {"a": size(a, c), "b": size(b, d)}}
            for a, b, c, d in zip(fm_small, fm_large, exp_small, exp_large, strict=True)]


class _Spec:
    @staticmethod
    def fm_fields():
        return {"main_tasks": ["like"], "aux_tasks": {}}


class _Study:
    surfaces = ["feed"]
    spec = _Spec()


def test_a_regression_gets_no_tr():
    # the larger FM is worse on every seed: the ratio of two regressions is not a TR
    per_seed = _per_seed([0.80, 0.81, 0.79], [0.82, 0.83, 0.81], [0.90, 0.91, 0.90],
                         [0.91, 0.92, 0.91])
    (row,) = scaling.transfers(per_seed, TINY, _Study())
    assert not row["fm_improved"] and row["tr_status"] == TR_NA and row["tr"]["mean"] is None


def test_a_clear_gain_gets_its_tr():
    per_seed = _per_seed([0.82, 0.83, 0.81], [0.80, 0.80, 0.79], [0.91, 0.92, 0.91],
                         [0.90, 0.905, 0.90])
    (row,) = scaling.transfers(per_seed, TINY, _Study())
    assert row["fm_improved"] and row["tr_status"] == "reported"
    assert math.isfinite(row["tr"]["mean"])


def test_flops_grow_with_width_depth_and_history():
    kw = toy_config_kwargs(10)
    sizes = [FMConfig(**kw, d_model=d, n_layers=n, n_heads=1, max_history=h)
             for d, n, h in ((16, 1, 16), (32, 1, 16), (32, 2, 16), (32, 2, 64))]
    flops = [fm_flops_per_candidate(c) for c in sizes]
    assert flops == sorted(flops) and len(set(flops)) == 4
    small, large = LADDER[0], LADDER[-1]
    ratio = (fm_flops_per_candidate(FMConfig(**kw, d_model=large.d_model,
                                             n_layers=large.n_layers, n_heads=large.n_heads,
                                             max_history=large.max_history))
             / fm_flops_per_candidate(FMConfig(**kw, d_model=small.d_model,
                                               n_layers=small.n_layers, n_heads=small.n_heads,
                                               max_history=small.max_history)))
    assert ratio >= 30 and len(LADDER) >= 5


# ---- the recipe's knobs (fm.config / fm.train) ------------------------------------------


def test_lr_schedule_warms_up_then_decays():
    kw = toy_config_kwargs(10)
    assert FMConfig(**kw).lr_at(0, 100) == FMConfig(**kw).lr_at(99, 100) == 3e-3  # default
    cfg = FMConfig(**kw, lr=1e-2, warmup_steps=10, lr_decay="cosine", min_lr_frac=0.1)
    lrs = [cfg.lr_at(s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # decays monotonically
    assert lrs[-1] == pytest.approx(1e-3)
    # a short run still reaches the peak: warm-up is at most a fifth of it
    assert cfg.lr_at(1, 10) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="lr_decay"):
        FMConfig(**kw, lr_decay="step")
    with pytest.raises(ValueError, match="epochs"):
        FMConfig(**kw, epochs=0)


def test_a_second_pass_starts_where_one_pass_ends():
    from fm import train_streaming

    events = toy_events(n_users=12, n_items=30, n_requests=96, n_candidates=3, seed=3)
    kw = {**toy_config_kwargs(30), "max_history": 8, "batch_requests": 32}
    one = train_streaming(events, FMConfig(**kw), progress=False)
    two = train_streaming(events, FMConfig(**kw, epochs=2), progress=False)
    assert two.steps == 2 * one.steps and len(two.pass_ne) == 2 and len(one.pass_ne) == 1
    for task, ne in one.ne.items():  # a constant lr: pass 1 of two is the whole of one
        assert two.pass_ne[0][task] == pytest.approx(ne, rel=1e-6)
    assert two.ne == two.pass_ne[1]
    decayed = FMConfig(**kw, weight_decay=0.1, embedding_decay=0.0)
    assert train_streaming(events, decayed, max_steps=2, progress=False).steps == 2


def test_heads_start_at_the_training_windows_base_rates():
    events = toy_events(n_users=12, n_items=30, n_requests=96, n_candidates=3, seed=3)
    cfg = FMConfig(**toy_config_kwargs(30), max_history=8)
    model = FoundationModel(cfg)
    start_heads_at_base_rates(model, Requests.from_events(events, cfg))
    for i, task in enumerate(cfg.main_tasks):
        p = float(np.nanmean(events[task].to_numpy(np.float64)))
        assert model.main_head.bias[i].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-5)
    for surface, head in model.aux_heads.items():
        on = events[events["surface"] == surface]
        for j, task in enumerate(cfg.aux_tasks[surface]):
            y = on[task].dropna().to_numpy(np.float64)
            want = math.log(y.mean() / (1 - y.mean())) if len(y) else 0.0
            assert head.mlp[-1].bias[j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # so the untrained model's NE on its own window is about 1 (the base rate), not above it
    lo, hi = events["event_timestamp"].min(), events["event_timestamp"].max()
    ne = evaluate_fm(model, events, cfg, lo, hi + pd.Timedelta(seconds=1))
    assert all(v < 1.05 for v in ne.values()), ne


def test_a_narrow_item_table_is_lifted_to_d_model():
    kw = toy_config_kwargs(30)
    cfg = FMConfig(**kw, d_model=16, n_heads=2, max_history=8, item_dim=4)
    model = FoundationModel(cfg).eval()
    assert model.embed.item.weight.shape == (30, 4) and model.embed.item_up.weight.shape == (16, 4)
    assert FoundationModel(FMConfig(**kw, d_model=16, n_heads=2, item_dim=16)).embed.item_up is None
    with pytest.raises(ValueError, match="item_dim"):
        FMConfig(**kw, item_dim=-1)
    events = toy_events(n_users=6, n_items=30, n_requests=24, n_candidates=3, seed=1)
    with torch.no_grad():
        model.embed.item.weight.normal_(0, 0.3)
    hist = UserHistories.from_events(events, cfg.surfaces)
    t = int(events["event_timestamp"].max().value // 1000) + 1
    user = int(events["user_id"].iloc[0])
    a = TAEEngine(model, hist).compute_request(user, t, cfg.surfaces[0], np.array([1, 2]))
    assert np.isfinite(a).all() and np.abs(a[0] - a[1]).max() > 1e-6
    # the lift is counted in the compute: the same size with a narrow table costs more
    wide = FMConfig(**kw, d_model=16, n_heads=2, max_history=8)
    assert fm_flops_per_candidate(cfg) == fm_flops_per_candidate(wide) + 9 * 4 * 16
