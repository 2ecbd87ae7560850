"""A toy event log with a learnable signal, for the FM's own tests and benchmarks.

Not the product's synthetic generator (that lives with the event producers): just enough
structure (users prefer one item cluster; two surfaces with their own tasks; NaN labels) to check
that the FM learns, masks and batches correctly, without touching the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fm.timefeatures import hour_of_day, to_us

SURFACES = ["feed", "video"]
MAIN_TASKS = ["click", "like"]
AUX_TASKS = {"feed": ["long_view"], "video": ["complete"]}
N_CLUSTERS = 5


def toy_events(
    n_users: int = 50,
    n_items: int = 100,
    n_requests: int = 400,
    n_candidates: int = 5,
    seed: int = 0,
    days: float = 10.0,
) -> pd.DataFrame:
    """Impressions of time-ordered requests; columns as in the canonical event log."""
    rng = np.random.default_rng(seed)
    start = to_us(pd.Timestamp("2024-01-01", tz="UTC"))
    req_ts = np.sort(start + rng.integers(0, int(days * 86400e6), n_requests))
    req_user = rng.integers(0, n_users, n_requests)
    req_surface = rng.integers(0, len(SURFACES), n_requests)
    pref = rng.integers(0, N_CLUSTERS, n_users)  # each user's favourite item cluster

    n = n_requests * n_candidates
    rep = np.repeat(np.arange(n_requests), n_candidates)
    user, surface, ts = req_user[rep], req_surface[rep], req_ts[rep]
    item = rng.integers(0, n_items, n)
    match = (item % N_CLUSTERS) == pref[user]

    click = rng.random(n) < np.where(match, 0.6, 0.1)
    like = click & (rng.random(n) < 0.4)
    long_view = rng.random(n) < np.where(match, 0.5, 0.15)
    complete = rng.random(n) < np.where(match, 0.45, 0.1)

    def label(x: np.ndarray, where: np.ndarray) -> np.ndarray:
        return np.where(where, x.astype(np.float32), np.float32(np.nan)).astype(np.float32)

    is_feed = surface == SURFACES.index("feed")
    like_known = rng.random(n) > 0.1  # some rows lack the label: NaN, outside the task
    hour = hour_of_day(ts).astype(np.int8)  # for people: the FM derives its own from ts
    return pd.DataFrame(
        {
            "request_id": (rep + 1000).astype(np.int64),
            "user_id": user.astype(np.int64),
            "item_id": item.astype(np.int64),
            "event_timestamp": pd.to_datetime(ts, unit="us", utc=True).astype(
                "datetime64[us, UTC]"
            ),
            "surface": np.asarray(SURFACES, dtype=object)[surface],
            "hour": hour,
            "action": (click.astype(np.int16) + 2 * (like & like_known)).astype(np.int16),
            "click": label(click, np.ones(n, bool)),
            "like": label(like, like_known),
            "long_view": label(long_view, is_feed),
            "complete": label(complete, ~is_feed),
        }
    )


def toy_config_kwargs(n_items: int = 100) -> dict[str, Any]:
    """Dataset fields of FMConfig matching `toy_events`."""
    return {
        "n_items": n_items,
        "surfaces": list(SURFACES),
        "main_tasks": list(MAIN_TASKS),
        "aux_tasks": {s: list(t) for s, t in AUX_TASKS.items()},
        "n_actions": 4,
    }


def __getattr__(name: str) -> Any:
    # random_batch moved to fm.batching (production code verifies exports with it); kept
    # importable from here lazily, so that importing the toy log does not import torch.
    if name == "random_batch":
        from fm.batching import random_batch

        return random_batch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
