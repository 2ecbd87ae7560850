"""The paper-tables job (a tiny synthetic run) and the user-level-embedding (UE) FM variant."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from experts.baselines import VARIANTS, ExpertSize, variant_config, variant_vectors
from experts.paper.ladder import FMSize, rung
from experts.paper.plan import Plan, plan_for
from experts.paper.report import markdown
from experts.paper.stats import (
    TR_NA,
    base_rate_floor,
    build_tables,
    check_targets,
    paired_gain,
    t95,
)
from experts.paper.tables import run
from fm import FMConfig, UserHistories
from fm.batching import collate
from fm.history import timestamps_us
from fm.user_embedding import UserEmbeddingModel, compute_user_embeddings, train_ue_streaming
from store_bridge.events.schema import DatasetSpec
from store_bridge.events.synthetic import SyntheticConfig, generate

TINY = Plan(
    max_users=60,
    fm_sizes=(FMSize("a", 8, 1, 1, 4), FMSize("b", 16, 1, 2, 8)),
    fm_max_steps=8,
    expert=ExpertSize(16, 4, 1, 256, min_steps=10, max_epochs=2),
    max_surfaces=1,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    result = run("synthetic", None, [0, 1], 30, out, plan=TINY, say=lambda _: None)
    return out, result


def test_report_files_and_json(tiny_run):
    out, result = tiny_run
    assert (out / "report.md").read_text().startswith("# Paper tables: synthetic")
    for png in result["plots"]:
        assert (out / png).stat().st_size > 1000
    assert {"table1_ne_diff.png", "table2_transfer.png", "table4_flops.png"} <= set(
        result["plots"]
    )
    loaded = json.loads((out / "result.json").read_text())  # strict JSON: NaN became null
    assert set(loaded["tables"]) == {
        "table1_ne_diff_vs_nofm",
        "table2_fm_small_vs_large",
        "table3_unseen_tasks",
        "table4_flops",
    }
    # The report names the two FM sizes; the JSON keeps the plan that made them.
    assert [s["name"] for s in loaded["plan"]["fm_sizes"]] == ["a", "b"]
    assert "FM small = a (d=8, 1 layers, history 4), FM large = b (d=16" in (
        out / "report.md").read_text()


def _finite(stat: dict) -> bool:
    return stat["mean"] is not None and math.isfinite(stat["mean"]) and math.isfinite(stat["std"])


def test_tables_have_finite_numbers_per_task_over_seeds(tiny_run):
    _, result = tiny_run
    t = result["tables"]
    seen = {r["task"] for r in t["table1_ne_diff_vs_nofm"]}
    assert {"click", "long_view"} <= seen  # the feed's FM tasks
    assert {r["task"] for r in t["table3_unseen_tasks"]} == {"hide"}  # the unseen task
    for row in t["table1_ne_diff_vs_nofm"] + t["table3_unseen_tasks"]:
        for v in ("ue", "tae", "ue_tae"):
            assert _finite(row[v]), row
            assert row[v]["n"] == 2  # both seeds: a real spread
    for row in t["table2_fm_small_vs_large"]:
        for key in ("fm_ne_diff", "expert_ne_diff"):
            assert _finite(row[key]), row
        # A TR only where the large FM is better, paired by seed; n/a elsewhere.
        assert row["fm_improved"] == row["fm_gain"]["clear"]
        if row["fm_improved"]:
            assert _finite(row["tr"]) and row["tr_status"] == "reported"
        else:
            assert row["tr"]["mean"] is None and row["tr_status"] == TR_NA
    assert any(r["expert_ne_diff"]["std"] > 0 for r in t["table2_fm_small_vs_large"])
    (flops,) = t["table4_flops"]
    assert 0 < flops["expert_flops"] < flops["one_stage_flops"]
    assert _finite(flops["mean_ne_expert"]) and _finite(flops["mean_ne_one_stage"])
    assert len(result["per_seed"]) == 2


def test_variants_feed_the_right_vectors():
    vec = {"ue": np.ones((3, 4)), "tae": np.zeros((3, 6)), "tae_small": np.zeros((3, 2))}
    assert variant_vectors("nofm", vec) is None and variant_vectors("one_stage", vec) is None
    assert variant_vectors("ue_tae", vec).shape == (3, 10)
    size = ExpertSize()
    for v in VARIANTS:
        cfg = variant_config(v, "feed", ["click"], size, seed=0)
        assert (cfg.fm_version is None) == (v in ("nofm", "one_stage"))
    big = variant_config("one_stage", "feed", ["click"], size, 0)
    assert big.hidden_dim > size.hidden_dim and big.history_length > size.history_length


# ---- the UE model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ue_setup():
    events, _, spec = generate(SyntheticConfig(n_users=20, n_items=40, n_categories=4, days=4))
    config = FMConfig.small(
        n_items=spec.n_items,
        surfaces=spec.surfaces,
        main_tasks=spec.main_tasks,
        aux_tasks={s: spec.fm_aux_tasks(s) for s in spec.surfaces},
        n_actions=spec.n_actions,
        max_history=8,
    )
    model = train_ue_streaming(events, config, max_steps=3, progress=False).model
    assert isinstance(model, UserEmbeddingModel)
    return events, spec, model


def test_ue_ignores_the_candidate(ue_setup):
    events, spec, model = ue_setup
    histories = UserHistories.from_events(events, spec.surfaces)
    users = events["user_id"].to_numpy(np.int64)[-6:]
    ts = timestamps_us(events["event_timestamp"])[-6:]
    off = np.arange(len(users) + 1)
    cands = []
    with torch.no_grad():
        for item, surface in [(1, 0), (7, 2)]:
            full = np.full(len(users), item)
            b = collate(histories, model.config, users, ts, off, full,
                        np.full(len(users), surface))
            cands.append((model.user_embedding(b), model(b)))
    torch.testing.assert_close(cands[0][0], cands[1][0], rtol=0, atol=0)
    assert not torch.allclose(cands[0][1], cands[1][1])  # the heads' input does see it
    ue = compute_user_embeddings(model, histories, users, ts)
    np.testing.assert_allclose(ue, cands[0][0].numpy(), atol=1e-6)


def test_ue_uses_history_strictly_before_ts(ue_setup):
    events, spec, model = ue_setup
    histories = UserHistories.from_events(events, spec.surfaces)
    ts_all = timestamps_us(events["event_timestamp"])
    user = int(events["user_id"].iloc[-1])
    mine = events[events["user_id"] == user]
    t = int(timestamps_us(mine["event_timestamp"]).max())  # the user's last request time
    before = events[ts_all < t]
    ue_full = compute_user_embeddings(model, histories, [user], [t])
    ue_past = compute_user_embeddings(
        model, UserHistories.from_events(before, spec.surfaces), [user], [t]
    )
    np.testing.assert_allclose(ue_full, ue_past, atol=1e-6)  # events at >= t are invisible
    # one more event at exactly t changes nothing; the same event 1 us earlier does
    extra = mine.iloc[[-1]].copy()
    extra["item_id"] = (extra["item_id"] + 1) % spec.n_items
    at_t = pd.concat([events, extra], ignore_index=True)
    ue_at = compute_user_embeddings(model, UserHistories.from_events(at_t, spec.surfaces),
                                    [user], [t])
    np.testing.assert_allclose(ue_full, ue_at, atol=1e-6)
    extra["event_timestamp"] = extra["event_timestamp"] - pd.Timedelta(1, "us")
    earlier = pd.concat([events, extra], ignore_index=True)
    ue_early = compute_user_embeddings(model, UserHistories.from_events(earlier, spec.surfaces),
                                       [user], [t])
    assert not np.allclose(ue_full, ue_early)


# ---- the judge: pure statistics on made-up per-seed numbers -------------------------------

SPEC = DatasetSpec("toy", ["feed"], ["click"], {"feed": ["click", "hide"]}, ["hide"])


def _seed(fm_small=0.90, fm_large=0.88, tae_small=0.85, tae=0.834, nofm=0.95, ue=0.93,
          ue_tae=0.92, one_stage=0.97, hide=(0.99, 0.98)):
    """One seed's `run_surface` numbers on the toy spec: click (FM task), hide (unseen).
    `tae` / `tae_small`: the +TAE expert on the large / small FM; `hide`: (no-FM, the rest)."""
    ne = {"nofm": nofm, "ue": ue, "tae": tae, "ue_tae": ue_tae, "tae_small": tae_small,
          "one_stage": one_stage}
    expert_ne = {v: {"click": x, "hide": hide[0] if v == "nofm" else hide[1]}
                 for v, x in ne.items()}
    fm = {"tae_small": {"click": fm_small}, "tae": {"click": fm_large}, "ue": {"click": 0.91}}
    return {"surfaces": {"feed": {
        "tasks": ["click", "hide"], "fm_ne": fm, "expert_ne": expert_ne,
        "flops": {"tae": 100, "one_stage": 1000, "nofm": 90},
        "params": {"tae": 10, "one_stage": 100},
        "floor": {"click": {"ne": 1.0003, "positives": 412}, "hide": {"ne": 1.02, "positives": 3}},
    }}}


def _judge(seeds):
    tables = build_tables(seeds, SPEC)
    targets = check_targets(tables)
    (row,) = tables["table2_fm_small_vs_large"]
    return tables, targets, row


def _report(tables, targets):
    windows = {"eval": ("2024-01-01", "2024-01-02")}
    return markdown({"data": "toy", "seeds": [0, 1, 2], "windows": windows, "events": 1,
                     "users": 1, "seconds": 1.0, "tables": tables, "targets": targets,
                     "plots": []})


def test_paired_gain_is_a_one_sided_paired_t_test():
    assert t95(1) == 6.314 and t95(2) == 2.920 and t95(500) == t95(30)
    g = paired_gain([3.0, 4.0, 5.0], [1.0, 2.0, 2.0])  # d = 2, 2, 3
    se = np.std([2, 2, 3], ddof=1) / np.sqrt(3)
    assert g["n"] == 3 and g["lower"] == pytest.approx(7 / 3 - 2.920 * se) and g["clear"]
    # Spread-out cells, consistent pairs: clear, because the judge pairs by seed.
    assert paired_gain([1.0, 5.0, 3.0], [0.5, 4.5, 2.5])["clear"]
    # Nothing is clear from one seed, nor from pairs with a missing side.
    assert not paired_gain([5.0], [1.0])["clear"]
    assert not paired_gain([5.0, None], [1.0, 2.0])["clear"]
    with pytest.raises(ValueError, match="one per seed"):
        paired_gain([1.0, 2.0], [1.0])


def test_transfer_ratio_is_na_where_the_larger_fm_regressed():
    # The large FM is worse on every seed, and so is its expert by the same amount: each
    # seed's TR is +1.0, which a judge of ratios alone would call met.
    seeds = [_seed(fm_small=s, fm_large=s + 0.03, tae_small=0.85, tae=0.88)
             for s in (0.90, 0.91, 0.92)]
    tables, targets, row = _judge(seeds)
    assert not row["fm_improved"] and row["fm_gain"]["mean"] < 0
    assert row["tr"]["mean"] is None and row["tr_status"] == TR_NA
    tr = targets["transfer_ratio"]
    assert (tr["rows"], tr["meeting"], tr["leaning"], tr["met"]) == (1, 0, 0, False)
    assert tr["judged"][0]["tr_status"] == TR_NA and not tr["judged"][0]["meets"]
    assert f"| {TR_NA} |" in _report(tables, targets)


def test_transfer_ratio_where_the_larger_fm_improved_clear_of_the_spread():
    fm_gain, tr_true = (0.020, 0.022, 0.025), (0.75, 0.85, 0.80)
    seeds = [_seed(fm_small=0.90, fm_large=0.90 - g, tae_small=0.85, tae=0.85 - r * g)
             for g, r in zip(fm_gain, tr_true, strict=True)]
    tables, targets, row = _judge(seeds)
    assert row["fm_improved"] and row["fm_gain"]["lower"] > 0
    assert row["tr_status"] == "reported" and row["tr"]["n"] == 3
    assert 0.6 <= row["tr"]["mean"] <= 1.2
    assert row["tr"]["mean"] == pytest.approx(np.mean(tr_true))
    assert targets["transfer_ratio"]["met"] and targets["transfer_ratio"]["meeting"] == 1
    # The same FM gains, but the expert keeps only ~30% of them: TR < 0.6, not met.
    low = [_seed(fm_small=0.90, fm_large=0.90 - g, tae_small=0.85, tae=0.85 - 0.3 * g)
           for g in fm_gain]
    _, targets, row = _judge(low)
    assert row["fm_improved"] and row["tr"]["mean"] == pytest.approx(0.3)
    assert not targets["transfer_ratio"]["met"]


def test_transfer_ratio_is_na_where_the_fm_gain_is_within_the_spread():
    # Mean FM gain +0.005 NE, but the seeds disagree (+0.03, -0.02, +0.005).
    seeds = [_seed(fm_small=0.90, fm_large=0.90 - g, tae_small=0.85, tae=0.85 - g)
             for g in (0.03, -0.02, 0.005)]
    tables, targets, row = _judge(seeds)
    assert row["fm_gain"]["mean"] > 0 and not row["fm_improved"]
    assert row["tr"]["mean"] is None and row["tr_status"] == TR_NA
    assert not targets["transfer_ratio"]["met"] and targets["transfer_ratio"]["meeting"] == 0
    # One seed shows no spread: a gain there is never clear either.
    _, targets, row = _judge(seeds[:1])
    assert not row["fm_improved"] and not targets["transfer_ratio"]["met"]


def test_ne_at_or_above_one_fails_as_worse_than_the_base_rate():
    # The no-FM expert is worse than the base rate; the +TAE expert "beats" it by 3%.
    seeds = [_seed(nofm=1.01 + e, ue=0.99 + e, tae=0.98 + e) for e in (0.0, 0.002, 0.004)]
    tables, targets, _ = _judge(seeds)
    base = targets["ne_below_base_rate"]
    assert not base["met"] and base["rows"] > base["meeting"]
    assert {(c["table"], c["task"], c["model"]) for c in base["failing"]} == {
        ("1", "click", "expert nofm"), ("4", "mean over tasks", "expert nofm"),
    }
    report = _report(tables, targets)
    assert "worse than the base rate" in report and "1.0120 ± 0.0020 ✗" in report
    # Each failing row says what the base-rate shift between the windows costs on its own.
    assert ("feed / click, expert nofm: NE 1.0120 (412 positives in the eval window; the "
            "training window's rate alone scores 1.0003)") in report
    assert "| every model's NE < 1 (NE >= 1: worse than the base rate) |" in report
    assert "| no |" in report.split("## Targets")[1]
    # All below 1 and clear of it: met, nothing failing.
    _, targets, _ = _judge([_seed(), _seed(), _seed(nofm=0.951)])
    assert targets["ne_below_base_rate"]["met"] and not targets["ne_below_base_rate"]["failing"]


def test_targets_are_judged_on_paired_seed_differences():
    # +TAE is 0.5 points ahead of +UE on every seed, while both move by 4 points across seeds:
    # the means' gap is far inside each cell's std, the paired differences are not.
    seeds = [_seed(nofm=0.95, ue=u, tae=u - 0.005) for u in (0.90, 0.94, 0.92)]
    tables, targets, _ = _judge(seeds)
    (row,) = tables["table1_ne_diff_vs_nofm"]
    assert row["tae"]["std"] > row["ue"]["mean"] - row["tae"]["mean"]
    assert targets["tae_beats_ue"]["met"] and targets["tae_beats_ue"]["meeting"] == 1
    # Unseen task and FLOPs: judged the same way.
    assert targets["unseen_gain"]["met"]  # hide: 0.98 vs 0.99 on every seed
    assert targets["expert_flops"]["met"]  # 10% of the FLOPs, NE below one-stage every seed
    # +TAE ahead on the mean of means (one seed by a lot), behind on two of three seeds.
    seeds = [_seed(ue=0.93, tae=t) for t in (0.85, 0.935, 0.94)]
    _, targets, _ = _judge(seeds)
    tae_ue = targets["tae_beats_ue"]
    assert (tae_ue["meeting"], tae_ue["leaning"], tae_ue["met"]) == (0, 1, False)
    assert not targets["expert_flops"]["met"]  # one seed's big lead is not a paired gain
    one_seed = check_targets(build_tables(seeds[:1], SPEC))
    assert not any(t["met"] for t in one_seed.values())


def test_run_reports_its_targets(tiny_run):
    out, result = tiny_run
    targets = result["targets"]
    assert set(targets) == {"tae_beats_ue", "transfer_ratio", "unseen_gain", "expert_flops",
                            "ne_below_base_rate"}
    t1 = result["tables"]["table1_ne_diff_vs_nofm"]
    assert targets["tae_beats_ue"]["rows"] == len(t1)
    paired = [paired_gain(r["ue"]["values"], r["tae"]["values"])["clear"] for r in t1]
    assert targets["tae_beats_ue"]["meeting"] == sum(paired)
    t2 = result["tables"]["table2_fm_small_vs_large"]
    assert targets["transfer_ratio"]["meeting"] <= sum(r["fm_improved"] for r in t2)
    assert "## Targets" in (out / "report.md").read_text()


def test_plan_trains_two_ladder_rungs_and_experts_stop_early():
    roomy, tight = plan_for(2700, 3, "movielens"), plan_for(900, 3, "kuairand")
    assert [s.name for s in roomy.fm_sizes] == ["xs", "xl"]
    assert [s.name for s in tight.fm_sizes] == ["xs", "m"]  # 5 min per seed: a cheaper large FM
    assert tight.fm_max_steps is not None and tight.fm_max_steps < plan_for(
        2000, 3, "kuairand").fm_max_steps  # and steps that follow the budget
    assert roomy.fm_max_steps is None and roomy.expert.holdout_frac > 0
    assert roomy.expert.for_rows(3_000).epochs == roomy.expert.max_epochs
    with pytest.raises(ValueError, match="unknown FM size 'xxl'"):
        rung("xxl")


def test_base_rate_floor_is_the_ne_of_the_training_rate():
    train = np.array([0.0] * 99 + [1.0] + [np.nan] * 5)  # 1% positives
    test = np.array([0.0] * 98 + [1.0] * 2)  # 2%
    floor = base_rate_floor(train, test)
    q, p = 0.02, 0.01
    expected = -(q * math.log(p) + (1 - q) * math.log(1 - p)) / -(
        q * math.log(q) + (1 - q) * math.log(1 - q))
    assert floor["positives"] == 2 and floor["ne"] == pytest.approx(expected, rel=1e-4)
    assert floor["ne"] > 1  # the shift alone puts a signal-free model above 1
    assert base_rate_floor(train, test[:0])["positives"] == 0
