"""The paper-tables job (a tiny synthetic run) and the user-level-embedding (UE) FM variant."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from experts.baselines import VARIANTS, ExpertSize, variant_config, variant_vectors
from experts.paper.plan import Plan
from experts.paper.tables import run
from fm import FMConfig, UserHistories
from fm.batching import collate
from fm.history import timestamps_us
from fm.user_embedding import UserEmbeddingModel, compute_user_embeddings, train_ue_streaming
from store_bridge.events.synthetic import SyntheticConfig, generate

TINY = Plan(
    max_users=60,
    fm_max_history=8,
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
        for key in ("fm_ne_diff", "expert_ne_diff", "tr"):
            assert _finite(row[key]), row
    assert any(r["tr"]["std"] > 0 for r in t["table2_fm_small_vs_large"])  # seeds differ
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


def _s(mean, std=0.1):
    return {"mean": mean, "std": std, "n": 3}


def test_targets_are_judged_from_the_tables():
    from experts.paper.stats import check_targets

    tables = {
        "table1_ne_diff_vs_nofm": [
            {"ue": _s(-1.0), "tae": _s(-2.0)},  # TAE ahead, clearly
            {"ue": _s(-1.0), "tae": _s(-1.05)},  # ahead within noise
            {"ue": _s(-2.0), "tae": _s(-1.0)},  # behind
        ],
        "table2_fm_small_vs_large": [{"tr": _s(0.9)}, {"tr": _s(0.5)}, {"tr": _s(None)}],
        "table3_unseen_tasks": [{"tae": _s(-0.5)}],
        "table4_flops": [
            {"flops_ratio": 0.1, "mean_ne_expert": _s(0.95), "mean_ne_one_stage": _s(0.99)},
            {"flops_ratio": 0.5, "mean_ne_expert": _s(0.95), "mean_ne_one_stage": _s(0.99)},
        ],
    }
    t = check_targets(tables)
    assert (t["tae_beats_ue"]["meeting"], t["tae_beats_ue"]["clear"], t["tae_beats_ue"]["met"]) == (2, 1, True)
    # The row without a TR (no positives in a window) is not judged at all.
    assert (t["transfer_ratio"]["meeting"], t["transfer_ratio"]["rows"], t["transfer_ratio"]["met"]) == (1, 2, False)
    assert t["unseen_gain"]["met"] and t["unseen_gain"]["clear"] == 1
    # Cheaper and better on average, but by less than the seeds' spread: not clear.
    assert (t["expert_flops"]["meeting"], t["expert_flops"]["clear"], t["expert_flops"]["met"]) == (1, 0, False)
    # From a single seed there is no spread, so nothing is clear.
    one_seed = {k: [{c: ({**v, "n": 1, "std": 0.0} if isinstance(v, dict) else v) for c, v in r.items()}
                    for r in rows] for k, rows in tables.items()}
    t = check_targets(one_seed)
    assert t["tae_beats_ue"]["meeting"] == 2 and all(v["clear"] == 0 for v in t.values())


def test_run_reports_its_targets(tiny_run):
    out, result = tiny_run
    targets = result["targets"]
    assert set(targets) == {"tae_beats_ue", "transfer_ratio", "unseen_gain", "expert_flops"}
    t1 = result["tables"]["table1_ne_diff_vs_nofm"]
    assert targets["tae_beats_ue"]["rows"] == len(t1)
    assert targets["tae_beats_ue"]["meeting"] == sum(r["tae"]["mean"] < r["ue"]["mean"] for r in t1)
    assert "## Targets" in (out / "report.md").read_text()
