"""Streaming training, resumption, checkpoints and the TAE engine."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fm import (
    FMConfig,
    TAEEngine,
    UserHistories,
    checkpoint_digest,
    evaluate_fm,
    load_checkpoint,
    save_checkpoint,
    train_streaming,
)
from fm.batching import Requests
from fm.history import timestamps_us
from fm.testing import toy_config_kwargs, toy_events


@pytest.fixture(scope="module")
def events():
    return toy_events(n_users=20, n_items=40, n_requests=320, n_candidates=4, seed=7)


@pytest.fixture(scope="module")
def config():
    return FMConfig.small(**toy_config_kwargs(40), max_history=16, batch_requests=32)


@pytest.fixture(scope="module")
def trained(events, config):
    return train_streaming(events, config, max_steps=6, progress=False)


def test_train_streaming_reports_finite_ne(trained, config):
    assert trained.steps == 6
    assert set(trained.ne) == set(config.fm_tasks)
    assert all(math.isfinite(v) and v > 0 for v in trained.ne.values())
    assert not trained.model.training
    assert trained.seconds > 0


def test_end_bounds_the_training_window(events, config):
    end = events["event_timestamp"].quantile(0.25)
    res = train_streaming(events, config, end=end, progress=False)
    n_req = events.loc[events["event_timestamp"] < end, "request_id"].nunique()
    assert res.steps == math.ceil(n_req / config.batch_requests)


def test_checkpoints_and_resume_continue_the_same_run(events, config, tmp_path, trained):
    first = train_streaming(
        events, config, checkpoint_dir=tmp_path, checkpoint_every=2, max_steps=3, progress=False
    )
    assert first.steps == 3
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == [
        "step_00000002.pt",
        "step_00000003.pt",
    ]
    resumed = train_streaming(
        events, config, checkpoint_dir=tmp_path, checkpoint_every=2, max_steps=6, progress=False
    )
    assert resumed.steps == 6
    assert [p.name for p in resumed.checkpoints] == ["step_00000004.pt", "step_00000006.pt"]
    # 3 + 3 resumed steps == 6 uninterrupted steps: same weights, same progressive NE
    for (name, a), b in zip(
        resumed.model.state_dict().items(), trained.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    for task, ne in trained.ne.items():
        assert resumed.ne[task] == pytest.approx(ne, rel=1e-4)
    _, extra = load_checkpoint(tmp_path / "step_00000006.pt")
    assert extra["step"] == 6


def test_evaluate_fm_uses_all_history(events, config, trained):
    ts = events["event_timestamp"]
    ne = evaluate_fm(
        trained.model, events, config, ts.quantile(0.7), ts.max() + pd.Timedelta(1, "s")
    )
    assert set(ne) == set(config.fm_tasks)
    assert all(math.isfinite(v) for v in ne.values())


def test_checkpoint_round_trip_and_digest(trained, config, events, tmp_path):
    path = save_checkpoint(trained.model, tmp_path / "fm.pt", {"note": "v1", "steps": 6})
    digest = checkpoint_digest(path)
    assert len(digest) == 64 and digest == checkpoint_digest(path)
    again = save_checkpoint(trained.model, tmp_path / "fm_again.pt", {"note": "v1", "steps": 6})
    assert checkpoint_digest(again) == digest  # same content, same bytes
    torch.load(path, weights_only=True)  # plain contents only

    model, extra = load_checkpoint(path)
    assert extra == {"note": "v1", "steps": 6}
    assert model.config == config
    reqs = Requests.from_events(events, config)
    h = UserHistories.from_events(events, config.surfaces)
    batch = reqs.batch(200, 232, h, config)
    with torch.no_grad():
        assert torch.equal(model(batch), trained.model(batch))

    # the pruned serving artifact: no heads, same TAEs
    serving = save_checkpoint(trained.model, tmp_path / "serving.pt", serving=True)
    state = torch.load(serving, weights_only=True)["state_dict"]
    assert not any(k.startswith(("main_head", "aux_heads")) for k in state)
    smodel, _ = load_checkpoint(serving)
    with torch.no_grad():
        assert torch.equal(smodel(batch), trained.model(batch))


def test_engine_matches_model_in_row_order(trained, config, events):
    h = UserHistories.from_events(events, config.surfaces)
    reqs = Requests.from_events(events, config)
    lo, hi = 250, 262
    with torch.no_grad():
        batch = reqs.batch(lo, hi, h, config)
        want = trained.model(batch)[batch.tgt_mask].numpy()  # rows in request order

    rows = slice(reqs.offsets[lo], reqs.offsets[hi])
    n = reqs.offsets[hi] - reqs.offsets[lo]
    users = np.repeat(reqs.user_id[lo:hi], np.diff(reqs.offsets[lo : hi + 1]))
    ts = np.repeat(reqs.ts_us[lo:hi], np.diff(reqs.offsets[lo : hi + 1]))
    surfaces = np.asarray(config.surfaces, dtype=object)[reqs.surface[rows]]
    perm = np.random.default_rng(0).permutation(n)  # rows in any order
    engine = TAEEngine(trained.model, h, max_groups=3, max_rows=7)  # forces several chunks
    got = engine.compute(users[perm], reqs.item[rows][perm], ts[perm], surfaces[perm])
    assert got.dtype == np.float32 and got.shape == (n, config.d_model)
    np.testing.assert_allclose(got, want[perm], atol=1e-5)

    one = engine.compute_request(
        int(reqs.user_id[lo]),
        int(reqs.ts_us[lo]),
        surfaces[0],
        reqs.item[reqs.offsets[lo] : reqs.offsets[lo + 1]],
    )
    np.testing.assert_allclose(one, want[: len(one)], atol=1e-5)


def test_engine_history_cut_at_request_time(trained, config, events):
    """A later event of the user changes the TAE only for requests after it."""
    h = UserHistories.from_events(events, config.surfaces)
    engine = TAEEngine(trained.model, h)
    user = int(events["user_id"].iloc[-1])
    ts = timestamps_us(events["event_timestamp"])[events["user_id"].to_numpy() == user]
    t_mid = int(ts[len(ts) // 2])
    a = engine.compute_request(user, t_mid, "feed", np.array([1, 2]))
    b = engine.compute_request(user, t_mid - 1, "feed", np.array([1, 2]))
    c = engine.compute_request(user, t_mid + 1, "feed", np.array([1, 2]))
    assert np.abs(a - c).max() > 1e-4  # the event at t_mid is visible only after t_mid
    b_hist, a_hist = h.before(user, t_mid - 1, 99), h.before(user, t_mid, 99)
    if len(a_hist) == len(b_hist):  # no event in (t_mid-1, t_mid): identical histories
        np.testing.assert_allclose(a, b, atol=1e-6)
