"""The expert's short-term input: each row's most recent events, point in time.

Encoding shared by training and serving (the online user-history view stores the same thing):
`items[i, j] = item_id + 1`, `actions[i, j] = action + 1`, 0 = padding, right-aligned so that
the most recent event is last.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from store_bridge.events.schema import EVENT_TIMESTAMP, timestamps_us


def recent_history(
    events: pd.DataFrame, user_ids: np.ndarray, ts_us: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each (user, time) row, the user's last `k` events with timestamp strictly before it.

    Events with equal timestamps keep their order in `events`. Strictly before means the
    impressions of the request being scored (which share its timestamp) are never visible.
    Vectorised: one sort of the events and one searchsorted for all rows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    user_ids = np.asarray(user_ids, dtype=np.int64)
    ts_us = np.asarray(ts_us, dtype=np.int64)
    if user_ids.shape != ts_us.shape or user_ids.ndim != 1:
        raise ValueError("user_ids and ts_us must be 1-d arrays of the same length")
    n, n_ev = len(user_ids), len(events)
    items = np.zeros((n, k), dtype=np.int64)
    actions = np.zeros((n, k), dtype=np.int64)
    if n == 0 or n_ev == 0:
        return items, actions

    ev_user = events["user_id"].to_numpy(dtype=np.int64)
    ev_ts = timestamps_us(events[EVENT_TIMESTAMP])
    # Dense ranks over events and queries together turn (user, time) into one int64 key
    # without overflow, whatever the raw id and timestamp ranges are.
    user_rank = np.unique(np.concatenate([ev_user, user_ids]), return_inverse=True)[1]
    ts_values, ts_rank = np.unique(np.concatenate([ev_ts, ts_us]), return_inverse=True)
    width = np.int64(len(ts_values) + 1)
    key = user_rank.astype(np.int64) * width + ts_rank
    ev_key, q_key = key[:n_ev], key[n_ev:]
    q_user_start = user_rank[n_ev:].astype(np.int64) * width  # smallest key of the user

    order = np.argsort(ev_key, kind="stable")  # stable: ties keep the log's order
    sorted_key = ev_key[order]
    end = np.searchsorted(sorted_key, q_key, side="left")  # first event at or after ts
    start = np.searchsorted(sorted_key, q_user_start, side="left")  # user's first event

    idx = end[:, None] - k + np.arange(k)[None, :]  # the k slots before `end`, oldest first
    valid = idx >= start[:, None]
    src = order[idx[valid]]
    items[valid] = events["item_id"].to_numpy(dtype=np.int64)[src] + 1
    actions[valid] = events["action"].to_numpy(dtype=np.int64)[src] + 1
    return items, actions
