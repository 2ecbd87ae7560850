"""KuaiRand-Pure (Gao et al., CIKM 2022) into the canonical event log.

Reads the official CSV files (plain or gzipped): one or more `log_standard_*` / `log_random_*`
logs, `video_features_basic_pure.csv` and, when present, `video_features_statistic_pure.csv`.
The partial copy in shared/data/kuairand-pure/ has the same headers, so one loader serves both.

Mapping:
  * surface = the `tab` column, as "tab0".."tab14";
  * tasks: click, long_view (main, shared by every tab), like, follow, comment, forward,
    profile_enter (auxiliary, valid on every tab) and hate (negative feedback, kept from the FM:
    the "unseen" task);
  * a request = one user's impressions at one millisecond (`time_ms`);
  * action = bitmask of click (1), long_view (2), like (4), any social action (8);
  * item category = the first tag of the video; quality = log-odds of its like rate from the
    statistics file (0 without it), standardised;
  * time: `time_ms` is the instant (UTC epoch milliseconds). The users are in China, so the
    spec's time zone is Asia/Shanghai (UTC+8, no DST since 1991) and `hour` is the local hour
    of `time_ms` there, derived the one way the FM derives it (fm.timefeatures). KuaiRand's
    own `hourmin` is not used: it is the local hour rounded (about a sixth of the rows of the
    partial copy read one hour later than their `time_ms`), a second, disagreeing copy.

Exact duplicate log rows (the partial copy has 5,460) are dropped and counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, local_hours, validate_events

LABELS = {  # canonical task <- KuaiRand column
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "profile_enter": "is_profile_enter",
    "hate": "is_hate",
}
MAIN_TASKS = ["click", "long_view"]
TIME_ZONE = "Asia/Shanghai"
UNSEEN_TASKS = ["hate"]
LOG_COLUMNS = ["user_id", "video_id", "time_ms", "hourmin", "tab", *LABELS.values()]


@dataclass
class LoadReport:
    files: list[str]
    rows_read: int
    duplicates_dropped: int
    events: int
    users: int
    items: int


def _find(directory: Path, stem: str) -> Path | None:
    for suffix in (".csv", ".csv.gz", ".reconstructed.csv.gz", ".reconstructed.csv"):
        p = directory / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def log_files(directory: Path) -> list[Path]:
    logs = sorted(p for p in directory.glob("log_*.csv*") if "_pure" in p.name)
    if not logs:
        raise FileNotFoundError(f"no KuaiRand-Pure log_*_pure.csv[.gz] files in {directory}")
    return logs


def _read_log(path: Path) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in LOG_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path.name}: not a KuaiRand log, columns missing: {missing}")
    return pd.read_csv(path, usecols=LOG_COLUMNS)


def _items(directory: Path, n_items: int) -> tuple[pd.DataFrame, int]:
    basic_path = _find(directory, "video_features_basic_pure")
    if basic_path is None:
        raise FileNotFoundError(f"video_features_basic_pure.csv[.gz] not found in {directory}")
    basic = pd.read_csv(basic_path, usecols=["video_id", "tag"])
    first_tag = pd.to_numeric(basic["tag"].astype(str).str.split(",").str[0], errors="coerce")
    category = np.zeros(n_items, dtype=np.int64)
    ok = basic["video_id"] < n_items
    # 0 is kept for "no tag"; tags shift up by one.
    category[basic.loc[ok, "video_id"]] = first_tag[ok].fillna(-1).astype(np.int64) + 1
    quality = np.zeros(n_items, dtype=np.float32)
    stat_path = _find(directory, "video_features_statistic_pure")
    if stat_path is not None:
        stat = pd.read_csv(stat_path, usecols=["video_id", "show_cnt", "like_cnt"])
        stat = stat[stat["video_id"] < n_items]
        rate = (stat["like_cnt"] + 1.0) / (stat["show_cnt"] + 50.0)
        logit = np.log(rate / (1 - rate))
        z = (logit - logit.mean()) / (logit.std() or 1.0)
        quality[stat["video_id"].to_numpy()] = z.to_numpy(np.float32)
    return (
        pd.DataFrame(
            {
                "item_id": np.arange(n_items, dtype=np.int64),
                "category": category,
                "quality": quality,
            }
        ),
        int(category.max()) + 1,
    )


def load_kuairand(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec, LoadReport]:
    """-> (events, items, spec, report) in the canonical layout (see schema.py)."""
    directory = Path(directory)
    paths = log_files(directory)
    raw = pd.concat([_read_log(p) for p in paths], ignore_index=True)
    n_read = len(raw)
    raw = raw.drop_duplicates()
    dropped = n_read - len(raw)
    raw = raw.sort_values(["time_ms", "user_id", "video_id"], kind="stable").reset_index(drop=True)

    surfaces = [f"tab{t}" for t in sorted(raw["tab"].unique())]
    ts = pd.Series(
        (raw["time_ms"].to_numpy(np.int64) * 1000).astype("datetime64[us]")
    ).dt.tz_localize("UTC")
    events = pd.DataFrame(
        {
            "user_id": raw["user_id"].to_numpy(np.int64),
            "item_id": raw["video_id"].to_numpy(np.int64),
            EVENT_TIMESTAMP: ts,
            "surface": "tab" + raw["tab"].astype(str),
            "hour": local_hours(ts, TIME_ZONE),
        }
    )
    # One request = one user's impressions at one instant.
    key = raw["user_id"].astype(np.int64) * (1 << 42) + raw["time_ms"].astype(np.int64)
    events.insert(0, "request_id", pd.factorize(key)[0].astype(np.int64))
    for task, col in LABELS.items():
        events[task] = raw[col].to_numpy(np.float32)
    social = raw[["is_follow", "is_comment", "is_forward", "is_profile_enter"]].max(axis=1)
    events["action"] = (
        raw["is_click"] + 2 * raw["long_view"] + 4 * raw["is_like"] + 8 * social
    ).astype(np.int16)

    n_items = int(events["item_id"].max()) + 1
    items, n_categories = _items(directory, n_items)
    start = events[EVENT_TIMESTAMP].min().floor("D")
    items[EVENT_TIMESTAMP] = pd.Series([start] * len(items)).astype("datetime64[us, UTC]")
    tasks = list(LABELS)
    spec = DatasetSpec(
        name="kuairand-pure",
        surfaces=surfaces,
        main_tasks=MAIN_TASKS,
        surface_tasks={s: tasks for s in surfaces},
        unseen_tasks=UNSEEN_TASKS,
        n_users=int(events["user_id"].max()) + 1,
        n_items=n_items,
        n_categories=n_categories,
        n_actions=16,
        time_zone=TIME_ZONE,
    )
    validate_events(events, spec)
    report = LoadReport(
        files=[p.name for p in paths],
        rows_read=n_read,
        duplicates_dropped=dropped,
        events=len(events),
        users=events["user_id"].nunique(),
        items=events["item_id"].nunique(),
    )
    return events, items, spec, report
