"""UserHistories: strictly-before lookups, truncation, unknown users; request batching."""

from __future__ import annotations

import numpy as np
import pytest

from fm import FMConfig, UserHistories
from fm.batching import Requests, collate, pad_ragged
from fm.history import timestamps_us
from fm.testing import toy_config_kwargs, toy_events


@pytest.fixture(scope="module")
def events():
    return toy_events(n_users=10, n_items=30, n_requests=200, n_candidates=3, seed=5)


@pytest.fixture(scope="module")
def histories(events):
    return UserHistories.from_events(events, ["feed", "video"])


def brute_force(events, user, ts_us, max_len):
    ts = timestamps_us(events["event_timestamp"])
    rows = events[(events["user_id"].to_numpy() == user) & (ts < ts_us)]
    # Events at one instant in the canonical order: by item, action, surface.
    rows = rows.assign(_ts=ts[rows.index], _s=rows["surface"].map({"feed": 0, "video": 1}))
    return rows.sort_values(["_ts", "item_id", "action", "_s"], kind="stable").tail(max_len)


def test_before_matches_brute_force(events, histories):
    rng = np.random.default_rng(0)
    ts_all = timestamps_us(events["event_timestamp"])
    for _ in range(40):
        user = int(rng.integers(0, 10))
        ts = int(rng.choice(ts_all)) + int(rng.integers(-1, 2))  # on, just before, just after
        max_len = int(rng.integers(1, 30))
        got = histories.before(user, ts, max_len)
        want = brute_force(events, user, ts, max_len)
        assert len(got) == len(want)
        assert (got.ts_us < ts).all()
        np.testing.assert_array_equal(got.ts_us, want["_ts"].to_numpy())
        np.testing.assert_array_equal(got.item, want["item_id"].to_numpy())
        np.testing.assert_array_equal(got.action, want["action"].to_numpy())


def test_impressions_of_the_same_request_never_see_each_other(events, histories):
    ts = timestamps_us(events["event_timestamp"])
    for rid in events["request_id"].unique()[50:60]:
        rows = events["request_id"].to_numpy() == rid
        user, t = int(events["user_id"][rows].iloc[0]), int(ts[rows][0])
        h = histories.before(user, t, 1000)
        assert (h.ts_us < t).all()
        assert len(h) == int(((events["user_id"].to_numpy() == user) & (ts < t)).sum())


def test_unknown_user_and_empty_log(histories):
    assert len(histories.before(123_456, 2**62, 10)) == 0
    empty = UserHistories.from_events(toy_events(n_requests=1).iloc[:0], ["feed", "video"])
    assert len(empty.before(1, 2**62, 10)) == 0


def test_lookup_is_vectorised_and_truncates(events, histories):
    users = np.array([0, 1, 2, 999])
    ts = np.full(4, 2**62)
    end, length = histories.lookup(users, ts, 5)
    assert list(length) == [5, 5, 5, 0]
    for u, e in zip(users[:3], end[:3], strict=True):
        assert histories.ts_us[e - 1] == histories.before(int(u), 2**62, 1).ts_us[0]


def test_collate_translates_surface_codes(events):
    cfg = FMConfig.small(**toy_config_kwargs(30), max_history=6)
    a = UserHistories.from_events(events, ["feed", "video"])
    b = UserHistories.from_events(events, ["video", "feed"])  # another code order
    args = (
        np.array([0, 1]),
        np.full(2, 2**62),
        np.array([0, 2, 3]),
        np.array([1, 2, 3]),
        np.array([0, 1, 0]),
    )
    ba, bb = collate(a, cfg, *args), collate(b, cfg, *args)
    np.testing.assert_array_equal(ba.hist_surface.numpy(), bb.hist_surface.numpy())
    assert ba.hist_len.tolist() == [6, 6]
    assert ba.tgt_mask.tolist() == [[True, True], [True, False]]
    # recency rank counts back from the most recent event, padding stays 0
    assert ba.hist_rank[0].tolist() == [5, 4, 3, 2, 1, 0]


def test_requests_are_time_ordered_groups(events):
    cfg = FMConfig.small(**toy_config_kwargs(30))
    reqs = Requests.from_events(events.sample(frac=1.0, random_state=0), cfg)  # shuffled rows
    assert len(reqs) == events["request_id"].nunique()
    assert (np.diff(reqs.ts_us) >= 0).all()
    assert (np.diff(reqs.offsets) == 3).all()
    labels = reqs.labels[:, cfg.fm_tasks.index("long_view")]
    feed = reqs.surface == cfg.surfaces.index("feed")
    assert np.isnan(labels[~feed]).all() and not np.isnan(labels[feed]).any()


def test_pad_ragged():
    out = pad_ragged(np.array([0, 2, 2, 5]), np.arange(5), fill=-1)
    assert out.tolist() == [[0, 1, -1], [-1, -1, -1], [2, 3, 4]]
