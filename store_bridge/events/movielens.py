"""MovieLens ratings into the canonical event log (ml-100k `u.data`, ml-1m `ratings.dat`).

One surface ("movielens"). A rating is an interaction; its value is the action (1..5) and the
tasks derive from it: `like` (rating >= 4, the main task), `love` (rating == 5, auxiliary) and
`dislike` (rating <= 2, kept from the FM: the "unseen" task). One request = one user's ratings
at one second. MovieLens has no item side information in these files, so every item's category
is 0 and quality 0. Timestamps are UTC epoch seconds and the raters live anywhere, so the
spec's time zone stays UTC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, local_hours, validate_events

SURFACE = "movielens"
TASKS = ["like", "love", "dislike"]


def _read_ratings(path: Path) -> pd.DataFrame:
    names = ["user_id", "item_id", "rating", "ts"]
    bad = f"{path}: not a MovieLens ratings file (user item rating timestamp, integers)"
    try:
        if path.name.endswith(".dat"):  # ml-1m: UserID::MovieID::Rating::Timestamp
            df = pd.read_csv(path, sep="::", engine="python", names=names)
        else:  # ml-100k u.data: tab separated
            df = pd.read_csv(path, sep="\t", names=names)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' parser and empty-file errors
        raise ValueError(f"{bad}: {e}") from e
    df = df.apply(pd.to_numeric, errors="coerce")
    if df.empty or df.isna().any().any() or not df["rating"].between(1, 5).all():
        raise ValueError(bad)
    return df.astype(np.int64)


def ratings_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    for name in ("ratings.dat", "u.data"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"no ratings.dat or u.data in {path}")


def load_movielens(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """-> (events, items, spec). `path`: a ratings file or the folder holding one."""
    raw = _read_ratings(ratings_file(path))
    raw = raw.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    ts = pd.to_datetime(raw["ts"].to_numpy(np.int64), unit="s", utc=True).astype(
        "datetime64[us, UTC]"
    )
    key = raw["user_id"].astype(np.int64) * (1 << 34) + raw["ts"].astype(np.int64)
    rating = raw["rating"].to_numpy(np.int64)
    events = pd.DataFrame(
        {
            "request_id": pd.factorize(key)[0].astype(np.int64),
            "user_id": raw["user_id"].to_numpy(np.int64),
            "item_id": raw["item_id"].to_numpy(np.int64),
            EVENT_TIMESTAMP: ts,
            "surface": SURFACE,
            "hour": local_hours(pd.Series(ts), "UTC"),  # the spec's zone: UTC
            "action": rating.astype(np.int16),
            "like": (rating >= 4).astype(np.float32),
            "love": (rating == 5).astype(np.float32),
            "dislike": (rating <= 2).astype(np.float32),
        }
    )
    n_items = int(events["item_id"].max()) + 1
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int64),
            "category": np.zeros(n_items, dtype=np.int64),
            "quality": np.zeros(n_items, dtype=np.float32),
            EVENT_TIMESTAMP: pd.Series([ts.min().floor("D")] * n_items).astype(
                "datetime64[us, UTC]"
            ),
        }
    )
    spec = DatasetSpec(
        name="movielens",
        surfaces=[SURFACE],
        main_tasks=["like"],
        surface_tasks={SURFACE: TASKS},
        unseen_tasks=["dislike"],
        n_users=int(events["user_id"].max()) + 1,
        n_items=n_items,
        n_categories=1,
        n_actions=6,
    )
    validate_events(events, spec)
    return events, items, spec
