"""MovieLens ratings into the canonical event log.

Three file formats:
  * ml-100k `u.data`: `user item rating timestamp`, tab separated, whole stars 1..5;
  * ml-1m `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, whole stars 1..5;
  * ml-latest(-small), ml-20m/25m `ratings.csv` (plain or `.csv.gz`): header
    `userId,movieId,rating,timestamp`, half stars 0.5..5.0.

One surface ("movielens"). A rating is an interaction and the tasks derive from its value in
stars, the same thresholds for every format: `like` (rating >= 4, the main task), `love`
(rating == 5, auxiliary) and `dislike` (rating <= 2, kept from the FM: the "unseen" task). So a
half-star 4.5 is a like, not a love; 2.5 is not a dislike. The action id (the history token's
engagement) is the rating itself: whole stars 1..5 (n_actions 6) for `u.data` / `ratings.dat`,
half stars 1..10 (0.5 stars = 1; n_actions 11) for `ratings.csv`.

Ids: `u.data` and `ratings.dat` ids are used as they are (they are already small: 1..N, so the
FM's vocabulary `[0, n_items)` wastes only id 0 and ml-1m's few gaps). `ratings.csv` ids are
sparse (ml-latest-small's movieIds run to 193,609 for 9,724 rated movies), so users and movies
are mapped to dense ints 0..n-1 in the order of their raw ids (the rank of the id among the
file's distinct ids: the mapping is recoverable from the file alone).

Requests and equal timestamps: one request = one user's ratings at one second (ml-latest-small:
23% of ratings share their user and second with another; users rate batches at once). Rows are
ordered by (time, user, item, rating), so request ids and the order inside a request never
depend on the file's row order. The order of ratings within one second is unknown, so none of
them is history for another: every history in foundex is strictly before the request's time
(`fm.UserHistories.lookup`, `experts.features.recent_history`), and the time split
(`schema.time_windows`) cuts at a whole second by comparing timestamps, so all the ratings of
one second (of every user) fall in the same window.

MovieLens has no item side information in these files, so every item's category is 0 and
quality 0. Timestamps are UTC epoch seconds and the raters live anywhere, so the spec's time zone
stays UTC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, local_hours, validate_events

SURFACE = "movielens"
TASKS = ["like", "love", "dislike"]
CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
# A folder is searched for these, in this order.
RATINGS_FILES = ("ratings.dat", "u.data", "ratings.csv", "ratings.csv.gz")


def _is_csv(path: Path) -> bool:
    return path.name.endswith((".csv", ".csv.gz"))


def _read_whole_stars(path: Path) -> pd.DataFrame:
    """u.data / ratings.dat -> user_id, item_id, rating (stars, float64), ts (epoch s)."""
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
    if not (df == df.round()).all().all():
        raise ValueError(bad)
    df = df.astype(np.int64)
    df["rating"] = df["rating"].astype(np.float64)
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    """ratings.csv(.gz) -> user_id, item_id (dense ranks), rating (half stars, float64), ts."""
    bad = f"{path}: not a MovieLens ratings file (header {','.join(CSV_HEADER)})"
    try:
        df = pd.read_csv(path)  # compression follows the name; CRLF lines read as LF
    except (ValueError, UnicodeDecodeError, OSError) as e:  # parser, empty file, bad gzip
        raise ValueError(f"{bad}: {e}") from e
    if list(df.columns[:4]) != CSV_HEADER:
        raise ValueError(f"{bad}: found header {list(df.columns)}")
    df = df[CSV_HEADER].apply(pd.to_numeric, errors="coerce")
    if df.empty or df.isna().any().any():
        raise ValueError(f"{bad}: empty, or a value that is not a number")
    ints = df[["userId", "movieId", "timestamp"]]
    if not (ints == ints.round()).all().all():
        raise ValueError(f"{bad}: userId, movieId and timestamp must be integers")
    rating = df["rating"].to_numpy(np.float64)
    if not ((rating >= 0.5) & (rating <= 5) & (rating * 2 == np.round(rating * 2))).all():
        raise ValueError(f"{bad}: ratings must be half stars 0.5..5.0")
    return pd.DataFrame(
        {
            "user_id": np.unique(df["userId"].to_numpy(np.int64), return_inverse=True)[1],
            "item_id": np.unique(df["movieId"].to_numpy(np.int64), return_inverse=True)[1],
            "rating": rating,
            "ts": df["timestamp"].to_numpy(np.int64),
        }
    )


def ratings_file(path: Path) -> Path:
    """`path` itself if it is a file, else the first of RATINGS_FILES in that folder.

    Raises FileNotFoundError naming the folder and the names looked for."""
    path = Path(path)
    if path.is_file():
        return path
    for name in RATINGS_FILES:
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"no {', '.join(RATINGS_FILES)} in {path}")


def load_movielens(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """-> (events, items, spec). `path`: a ratings file or the folder holding one (see
    RATINGS_FILES); the format follows the file name (`*.csv`, `*.csv.gz`: the csv format;
    `*.dat`: ml-1m; otherwise ml-100k's tab separated `u.data`).

    Raises FileNotFoundError (no ratings file) or ValueError (a file not in its format).
    """
    source = ratings_file(path)
    half_stars = _is_csv(source)
    raw = _read_csv(source) if half_stars else _read_whole_stars(source)
    # Time, then user: request ids follow time; item and rating make the order total.
    raw = raw.sort_values(["ts", "user_id", "item_id", "rating"], kind="stable")
    raw = raw.reset_index(drop=True)
    ts = pd.to_datetime(raw["ts"].to_numpy(np.int64), unit="s", utc=True).astype(
        "datetime64[us, UTC]"
    )
    rating = raw["rating"].to_numpy(np.float64)
    action = np.round(rating * 2) if half_stars else rating
    events = pd.DataFrame(
        {
            "request_id": _request_ids(raw["user_id"], raw["ts"]),
            "user_id": raw["user_id"].to_numpy(np.int64),
            "item_id": raw["item_id"].to_numpy(np.int64),
            EVENT_TIMESTAMP: ts,
            "surface": SURFACE,
            "hour": local_hours(pd.Series(ts), "UTC"),  # the spec's zone: UTC
            "action": action.astype(np.int16),
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
        n_actions=11 if half_stars else 6,
    )
    validate_events(events, spec)
    return events, items, spec


def _request_ids(user_id: pd.Series, ts: pd.Series) -> np.ndarray:
    """int64 [n]: one id per (user, second), numbered in order of first appearance (the rows
    are time-ordered, so ids increase with time)."""
    keys = pd.MultiIndex.from_arrays([user_id.to_numpy(np.int64), ts.to_numpy(np.int64)])
    return pd.factorize(keys)[0].astype(np.int64)
