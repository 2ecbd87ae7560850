"""Recent history is point-in-time correct: equal to a brute-force loop oracle."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from experts import add_recent_history, recent_history
from store_bridge.events.schema import timestamps_us

T0 = 1_767_571_200_000_000  # 2026-01-05 in microseconds


def make_events(rng: np.random.Generator, n: int, n_users: int) -> pd.DataFrame:
    # Coarse timestamps on purpose: many ties, within a user and across users.
    ts = T0 + rng.integers(0, 200, size=n) * 1_000_000
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, n_users, size=n) * 7 + 3,  # sparse, non-contiguous ids
            "item_id": rng.integers(0, 50, size=n),
            "event_timestamp": pd.to_datetime(ts, unit="us", utc=True).astype(
                "datetime64[us, UTC]"
            ),
            "action": rng.integers(0, 16, size=n),
        }
    )


def oracle(events: pd.DataFrame, users, ts_us, k: int):
    ev_ts = timestamps_us(events["event_timestamp"])
    items = np.zeros((len(users), k), dtype=np.int64)
    actions = np.zeros((len(users), k), dtype=np.int64)
    for i, (u, t) in enumerate(zip(users, ts_us, strict=True)):
        rows = [j for j in range(len(events)) if events["user_id"].iat[j] == u and ev_ts[j] < t]
        rows.sort(key=lambda j: ev_ts[j])  # stable: ties keep the log's order
        rows = rows[-k:]
        for slot, j in enumerate(rows, start=k - len(rows)):
            items[i, slot] = events["item_id"].iat[j] + 1
            actions[i, slot] = events["action"].iat[j] + 1
    return items, actions


def test_matches_brute_force_oracle():
    rng = np.random.default_rng(0)
    events = make_events(rng, 600, n_users=12)
    n_q = 300
    # Queries: some at exact event times (ties must be excluded), some unknown users.
    users = rng.integers(0, 14, size=n_q) * 7 + 3
    ts = T0 + rng.integers(-5, 210, size=n_q) * 1_000_000
    ts[:100] = timestamps_us(events["event_timestamp"])[:100]
    users[:100] = events["user_id"].to_numpy()[:100]
    for k in (1, 5, 64):
        got = recent_history(events, users, ts, k)
        want = oracle(events, users, ts, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_strictly_before_and_right_aligned():
    ts = pd.to_datetime([T0, T0 + 10, T0 + 20, T0 + 20], unit="us", utc=True)
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2],
            "item_id": [10, 11, 12, 13],
            "event_timestamp": ts.astype("datetime64[us, UTC]"),
            "action": [0, 1, 2, 3],
        }
    )
    items, actions = recent_history(
        events, np.array([1, 1, 1, 2, 9]), np.array([T0, T0 + 20, T0 + 21, T0 + 21, T0 + 99]), 3
    )
    np.testing.assert_array_equal(
        items, [[0, 0, 0], [0, 11, 12], [11, 12, 13], [0, 0, 14], [0, 0, 0]]
    )
    np.testing.assert_array_equal(actions, [[0, 0, 0], [0, 1, 2], [1, 2, 3], [0, 0, 4], [0, 0, 0]])


def test_add_recent_history_uses_row_timestamps():
    rng = np.random.default_rng(1)
    events = make_events(rng, 300, n_users=5)
    frame = events.sample(50, random_state=0).reset_index(drop=True)
    out = add_recent_history(frame, events, 4)
    assert "recent_items" not in frame.columns
    want_items, want_actions = oracle(
        events, frame["user_id"].to_numpy(), timestamps_us(frame["event_timestamp"]), 4
    )
    np.testing.assert_array_equal(np.stack(out["recent_items"]), want_items)
    np.testing.assert_array_equal(np.stack(out["recent_actions"]), want_actions)


def test_fast_on_200k_rows():
    rng = np.random.default_rng(2)
    events = make_events(rng, 200_000, n_users=5_000)
    users = events["user_id"].to_numpy()
    ts = timestamps_us(events["event_timestamp"])
    start = time.perf_counter()
    items, _ = recent_history(events, users, ts, 8)
    elapsed = time.perf_counter() - start
    assert items.shape == (200_000, 8)
    assert elapsed < 5.0, elapsed
