"""The canonical event log: one row per impression, the offline source every other stage reads.

Columns (parquet):
    request_id        int64      impressions shown together share one request
    user_id           int64
    item_id           int64
    event_timestamp   timestamp[us, UTC]   microseconds: Feast's DuckDB path rejects nanoseconds
    surface           string     where the impression was shown (one of DatasetSpec.surfaces)
    hour              int8       local hour of day in DatasetSpec.time_zone, for people to read:
                                 the FM never reads this column, it derives the same value
                                 from event_timestamp (fm.timefeatures.hour_of_day)
    action            int16      the engagement seen on the impression as a small id (a bitmask
                                 of the dataset's action tasks, 0 = none); history tokens carry it
    <task>            float32    one column per task label; NaN where the task does not apply
                                 on that row's surface (outside the task's space)

Items (parquet, Feast's `item_features` source):
    item_id int64, category int64, quality float32, event_timestamp timestamp[us, UTC]

`DatasetSpec` travels beside the log as `spec.json`: which surfaces exist, which tasks apply
where, which tasks the FM must never train on, and the time zone whose local hour of day is
the dataset's context (the FM config takes it from here: `fm_fields`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

# The time conversions live in fm.timefeatures (numpy/pandas only: importing it never imports
# torch); as_microseconds and timestamps_us are re-exported for the readers of event logs.
from fm.timefeatures import as_microseconds, check_time_zone, hour_of_day, timestamps_us

__all__ = [
    "EVENT_TIMESTAMP",
    "ITEM_FEATURES",
    "ITEM_SCHEMA",
    "KEY_COLUMNS",
    "DatasetSpec",
    "as_microseconds",
    "event_arrow_schema",
    "local_hours",
    "time_windows",
    "timestamps_us",
    "validate_events",
]

EVENT_TIMESTAMP = "event_timestamp"
KEY_COLUMNS = ["request_id", "user_id", "item_id", EVENT_TIMESTAMP, "surface", "hour", "action"]
ITEM_FEATURES = ["category", "quality"]


@dataclass
class DatasetSpec:
    """What a dataset's tasks and surfaces are; shared by the FM, the experts and the store."""

    name: str
    surfaces: list[str]
    main_tasks: list[str]  # shared by every surface; the FM's main head trains on them
    surface_tasks: dict[str, list[str]]  # surface -> every task valid there (main ones included)
    unseen_tasks: list[str] = field(default_factory=list)  # never shown to the FM
    n_users: int = 0
    n_items: int = 0
    n_categories: int = 0
    n_actions: int = 1  # action ids lie in [0, n_actions)
    # Where the users live: the time zone of the hour-of-day context ("UTC", "+08:00" or an
    # IANA name; see fm.timefeatures). spec.json files written before it existed read "UTC".
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        check_time_zone(self.time_zone)

    @property
    def all_tasks(self) -> list[str]:
        seen: list[str] = []
        for tasks in [self.main_tasks, *self.surface_tasks.values(), self.unseen_tasks]:
            seen.extend(t for t in tasks if t not in seen)
        return seen

    def fm_aux_tasks(self, surface: str) -> list[str]:
        """Surface-specific tasks the FM trains on through that surface's alignment module."""
        return [
            t
            for t in self.surface_tasks[surface]
            if t not in self.main_tasks and t not in self.unseen_tasks
        ]

    def fm_fields(self) -> dict[str, Any]:
        """The dataset's part of an `fm.FMConfig`: items, surfaces, the tasks the FM trains on
        (never the unseen ones), actions, time zone."""
        return {
            "n_items": self.n_items,
            "surfaces": list(self.surfaces),
            "main_tasks": list(self.main_tasks),
            "aux_tasks": {s: self.fm_aux_tasks(s) for s in self.surfaces},
            "n_actions": self.n_actions,
            "time_zone": self.time_zone,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> DatasetSpec:
        return cls(**json.loads(path.read_text()))


ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("category", pa.int64()),
        ("quality", pa.float32()),
        (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]
)


def event_arrow_schema(tasks: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("request_id", pa.int64()),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")),
            ("surface", pa.string()),
            ("hour", pa.int8()),
            ("action", pa.int16()),
            *[(t, pa.float32()) for t in tasks],
        ]
    )


def local_hours(ts: pd.Series, time_zone: str) -> np.ndarray:
    """The `hour` column of an event log: int8 local hour of day of each timestamp in
    `time_zone`, derived exactly as the FM derives its own (fm.timefeatures.hour_of_day)."""
    return hour_of_day(timestamps_us(ts), time_zone).astype(np.int8)


def validate_events(df: pd.DataFrame, spec: DatasetSpec) -> None:
    """Raise ValueError naming the first problem found in an event log."""
    missing = [c for c in KEY_COLUMNS + spec.all_tasks if c not in df.columns]
    if missing:
        raise ValueError(f"event log lacks columns: {missing}")
    if str(df[EVENT_TIMESTAMP].dtype) != "datetime64[us, UTC]":
        raise ValueError(
            f"event_timestamp must be datetime64[us, UTC], got {df[EVENT_TIMESTAMP].dtype}"
        )
    unknown = set(df["surface"].unique()) - set(spec.surfaces)
    if unknown:
        raise ValueError(f"event log has surfaces not in the spec: {sorted(unknown)}")


def time_windows(events: pd.DataFrame) -> dict[str, tuple[pd.Timestamp, pd.Timestamp]]:
    """FM trains on the first 60% of the log; experts train on the next 20%, are judged on the
    last 20% (always a later window than anything they or the FM trained on)."""
    t0, t1 = events[EVENT_TIMESTAMP].min(), events[EVENT_TIMESTAMP].max() + pd.Timedelta(1, "us")
    span = t1 - t0
    fm_end, expert_end = (t0 + span * 0.6).floor("s"), (t0 + span * 0.8).floor("s")
    return {"fm": (t0, fm_end), "expert_train": (fm_end, expert_end), "eval": (expert_end, t1)}
