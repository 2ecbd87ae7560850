"""Ingestion: events in the canonical schema, checked row by row against the repo's dataset
spec, appended to the events stream (`POST /v1/events`, `foundex ingest`).

One event (a JSON object of the REST face, or a row of a parquet/CSV log):

    user_id, item_id     integers (int64)
    event_timestamp      an ISO-8601 time WITH a zone ("2026-01-05T10:00:00Z", "...+08:00"),
                         or (JSON only) integer microseconds since the epoch; a file may hold a
                         tz-aware timestamp column. A time without a zone is refused: its
                         instant is ambiguous. Kept as int64 µs UTC, 1970-01-01 .. 2262-04-10.
    surface              one of the spec's surfaces
    action               integer in [0, spec.n_actions)
    labels               one float per task of the spec; JSON: an object {task: number|null}
                         (a file: one column per task); a missing label is NaN, a name that is
                         not a task of the spec is refused, and so are infinite values
    request_id           optional integer (default 0)
    event_id             optional string, 1..128 characters, not starting with "c-"; absent,
                         it is derived from the content (records.content_ids), so that the same
                         event sent twice gets the same id
    hour                 optional and ignored: derived from the time in the spec's time zone

Semantics: bad rows are rejected one by one (`Rejected`: the row's 0-based index, the first
bad field, why), the good rows are accepted, nothing else in the call is lost. Accepted rows
are appended in stream entries of `settings.stream_batch_events` events; an id the stream saw
within `settings.event_dedup_s` seconds is not appended again (a duplicate: still accepted,
so resending a batch is safe). A full stream raises Overloaded (nothing dropped).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import redis

from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid, Overloaded
from fm.timefeatures import hour_of_day, timestamps_us, to_us
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, event_arrow_schema
from store_bridge.streams.records import (
    DERIVED_PREFIX,
    EVENT_ID,
    MAX_EVENT_ID_LEN,
    content_ids,
)
from store_bridge.training_set import EARLIEST_US, LATEST_US

if TYPE_CHECKING:
    from store_bridge.streams.stream import RedisStream

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
REQUIRED = ("user_id", "item_id", EVENT_TIMESTAMP, "surface", "action")
INT_FIELDS = ("request_id", "user_id", "item_id", "action")
IGNORED = ("hour",)  # canonical, but derived here from the time
LABELS = "labels"  # the JSON face's object of task labels
SHOWN = 5  # rejected rows a one-line summary names before it counts the rest


@dataclass
class Rejected:
    """One refused row: its 0-based index in the input, the first bad field, why."""

    row: int
    field: str
    message: str


@dataclass
class IngestResult:
    """What one `ingest` call did.

    `event_ids`: the id of every accepted row, in input order (`rows`: their input indices);
    `duplicates`: how many of them the stream already held (seen within the dedup window, or
    repeated in this call) and so were not appended again; `rejected`: one entry per refused
    row, in row order."""

    event_ids: list[str]
    rows: list[int]
    duplicates: int
    rejected: list[Rejected]

    @property
    def accepted(self) -> int:
        return len(self.event_ids)

    @property
    def new(self) -> int:
        """Events appended to the stream by this call."""
        return self.accepted - self.duplicates

    def summary(self, shown: int = SHOWN) -> str:
        """One line naming the first `shown` rejected rows and their fields, then a count."""
        total = self.accepted + len(self.rejected)
        head = (f"{len(self.rejected)} of {total} events rejected (the other "
                f"{self.accepted} accepted)")
        parts = [f"row {r.row} {r.field}: {r.message}" for r in self.rejected[:shown]]
        more = len(self.rejected) - shown
        tail = f" (and {more} more rows)" if more > 0 else ""
        return f"{head}: {'; '.join(parts)}{tail}" if parts else head


def ingest(ctx: ServiceContext, events: pd.DataFrame | list[Any]) -> IngestResult:
    """Check `events` (a DataFrame in the canonical schema, or a list of JSON objects: an item
    that is not an object is a bad row; see the module docstring) and append the good rows to
    `ctx.events_stream`.

    Raises Conflict (the repo has no dataset spec), Invalid (a DataFrame whose columns are
    wrong as a whole: a required column missing, an unknown column, times without a zone or
    as numbers), Overloaded (the stream is full; `appended`: events of this call that went
    in before it filled), StoreUnavailable (Redis did not answer; resending is safe while
    `event_dedup_s` > 0)."""
    spec = dataset_spec(ctx)
    tasks = spec.all_tasks
    if isinstance(events, pd.DataFrame):
        rows = _from_frame(events, tasks)
    else:
        rows = _from_rows(events, tasks)
    _check_values(rows, spec)
    good = np.ones(rows.n, dtype=bool)
    good[list(rows.problems)] = False
    keep = np.flatnonzero(good)
    rejected = [rows.problems[i] for i in sorted(rows.problems)]
    if len(keep) == 0:
        return IngestResult([], [], 0, rejected)
    table = _table(rows, keep, spec)
    duplicates = _append(ctx, table)
    ids = [str(x) for x in table.column(EVENT_ID).to_pylist()]
    return IngestResult(ids, keep.tolist(), duplicates, rejected)


# --- the spec, the stream ---------------------------------------------------------------------

_specs: dict[Path, tuple[tuple, DatasetSpec]] = {}
_ensured: set[tuple[str, str]] = set()
_ensure_lock = threading.Lock()


def dataset_spec(ctx: ServiceContext) -> DatasetSpec:
    """The repo's DatasetSpec (data/events/spec.json), re-read when the file changes. Raises
    Conflict when there is none, or it does not load."""
    path = ctx.repo.events_dir / "spec.json"
    try:
        st = path.stat()
    except OSError:
        raise Conflict(f"no dataset spec at {path}: run `foundex demo` or load a dataset") from None
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _specs.get(path)
    if cached is None or cached[0] != key:
        try:
            cached = (key, DatasetSpec.load(path))
        except (OSError, ValueError, TypeError) as e:
            raise Conflict(f"dataset spec {path} does not load: {e}") from None
        _specs[path] = cached
    return cached[1]


def _ensure_groups(ctx: ServiceContext, stream: RedisStream) -> None:
    """Create the stream's consumer groups before its first event (once per process), so
    that retention waits for every group from the start."""
    key = (ctx.redis_url, stream.key)
    if key in _ensured:
        return
    with _ensure_lock:
        if key not in _ensured:
            stream.ensure_groups()
            _ensured.add(key)


def _append(ctx: ServiceContext, table: pa.Table) -> int:
    """Append `table` in entries of settings.stream_batch_events events -> duplicates."""
    from store_bridge.streams.stream import StreamFull

    stream = ctx.events_stream
    size = ctx.settings.stream_batch_events
    duplicates = done = 0
    try:
        _ensure_groups(ctx, stream)
        for start in range(0, table.num_rows, size):
            chunk = table.slice(start, size)
            duplicates += stream.append(chunk).duplicates
            done += chunk.num_rows
    except StreamFull as e:
        note = (f"; the first {done} of these {table.num_rows} events were taken in before it "
                "filled (resending them all is safe: ids deduplicate)"
                if done else "; none of these events was taken in")
        raise Overloaded(f"{e}{note}", appended=done - duplicates) from None
    except redis.RedisError as e:
        from api.services.errors import StoreUnavailable

        # A timed-out append may still have gone in: a resend is answered as duplicates.
        raise StoreUnavailable(f"redis: {e}; the first {done} of these {table.num_rows} events "
                               "were taken in, the others may not have been: resending them "
                               "all is safe (ids deduplicate)") from e
    return duplicates


# --- rows: read each field, then check values against the spec -------------------------------


@dataclass
class _Rows:
    """Candidate events as columns (bad rows hold placeholders) and each bad row's problem."""

    n: int
    ints: dict[str, np.ndarray]  # INT_FIELDS -> int64 [n]
    ts_us: np.ndarray  # int64 [n]
    surface: np.ndarray  # object [n]
    labels: dict[str, np.ndarray]  # task -> float64 [n], NaN where missing
    event_id: np.ndarray  # object [n], None where absent
    label_prefix: str  # how a problem names a label: "labels.<task>" (JSON) or "<task>" (file)
    problems: dict[int, Rejected] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int, tasks: list[str], label_prefix: str) -> _Rows:
        return cls(
            n=n, ints={f: np.zeros(n, np.int64) for f in INT_FIELDS}, ts_us=np.zeros(n, np.int64),
            surface=np.full(n, "", dtype=object), labels={t: np.full(n, np.nan) for t in tasks},
            event_id=np.full(n, None, dtype=object), label_prefix=label_prefix,
        )  # fmt: skip

    def reject(self, bad: np.ndarray, name: str, message: str) -> None:
        """Record `message` for the rows in the bool mask `bad` that have no problem yet."""
        for i in np.flatnonzero(bad).tolist():
            self.problems.setdefault(i, Rejected(i, name, message))


def _check_values(rows: _Rows, spec: DatasetSpec) -> None:
    """The rules of the values, whichever face they came from (vectorised)."""
    ts = rows.ts_us
    rows.reject((ts < EARLIEST_US) | (ts >= LATEST_US), EVENT_TIMESTAMP,
                "outside the supported range 1970-01-01 .. 2262-04-10 UTC")
    known = ", ".join(spec.surfaces)
    rows.reject(~pd.Series(rows.surface).isin(spec.surfaces).to_numpy(), "surface",
                f"not a surface of the dataset (known: {known})")
    action = rows.ints["action"]
    rows.reject((action < 0) | (action >= spec.n_actions), "action",
                f"must lie in [0, {spec.n_actions}) (the dataset's action ids)")
    for task, values in rows.labels.items():
        # NaN (missing) compares False; an infinity or a float32 overflow is refused
        rows.reject(np.abs(values) > FLOAT32_MAX, rows.label_prefix + task,
                    "must be a finite number (or null / absent when missing)")
    ids = rows.event_id
    given = np.array([x is not None for x in ids], dtype=bool)
    if given.any():
        bad = np.zeros(rows.n, dtype=bool)
        for i in np.flatnonzero(given).tolist():
            eid = ids[i]
            bad[i] = not 0 < len(eid) <= MAX_EVENT_ID_LEN or eid.startswith(DERIVED_PREFIX)
        rows.reject(bad, EVENT_ID, f"must be 1..{MAX_EVENT_ID_LEN} characters, not starting "
                                   f"with {DERIVED_PREFIX!r} (derived ids use that prefix)")


def _table(rows: _Rows, keep: np.ndarray, spec: DatasetSpec) -> pa.Table:
    """The accepted rows as the stream's record batch: the canonical event schema (hour
    derived from the time in the spec's time zone) + event_id."""
    ts = rows.ts_us[keep]
    ints = {f: rows.ints[f][keep] for f in INT_FIELDS}
    surface = rows.surface[keep]
    ids = rows.event_id[keep].copy()
    absent = np.array([x is None for x in ids], dtype=bool)
    if absent.any():
        ids[absent] = content_ids(ints["user_id"][absent], ints["item_id"][absent], ts[absent],
                                  surface[absent], ints["action"][absent])
    schema = event_arrow_schema(spec.all_tasks).append(pa.field(EVENT_ID, pa.string()))
    columns = {
        "request_id": ints["request_id"], "user_id": ints["user_id"], "item_id": ints["item_id"],
        EVENT_TIMESTAMP: ts, "surface": surface,
        "hour": hour_of_day(ts, spec.time_zone).astype(np.int8),
        "action": ints["action"].astype(np.int16),
        **{t: rows.labels[t][keep].astype(np.float32) for t in spec.all_tasks},
        EVENT_ID: ids,
    }  # fmt: skip
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# --- the JSON face: a list of objects ---------------------------------------------------------


def _from_rows(events: list[Any], tasks: list[str]) -> _Rows:
    rows = _Rows.empty(len(events), tasks, f"{LABELS}.")
    for i, event in enumerate(events):
        problem = _read_object(event, i, rows, tasks)
        if problem is not None:
            rows.problems[i] = Rejected(i, *problem)
    return rows


def _kind(value: object) -> str:
    """What a JSON value is, in words (the value itself is never quoted back)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}  # fmt: skip
    return next((n for t, n in names.items() if isinstance(value, t)), "another type")


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else name[:limit] + "..."


def _read_object(event: object, i: int, rows: _Rows, tasks: list[str]) -> tuple[str, str] | None:
    """Read one JSON object into row `i` -> (field, message) of its first problem, or None."""
    if not isinstance(event, dict):
        return "event", f"must be a JSON object, got {_kind(event)}"
    problem = _json_fields(event, tasks) or _json_ints(event, i, rows)
    if problem is not None:
        return problem
    ts = _json_time(event[EVENT_TIMESTAMP])
    if isinstance(ts, str):
        return EVENT_TIMESTAMP, ts
    rows.ts_us[i] = ts
    if not isinstance(event["surface"], str):
        return "surface", f"must be a string, got {_kind(event['surface'])}"
    rows.surface[i] = event["surface"]
    problem = _json_labels(event.get(LABELS), i, rows, tasks)
    if problem is not None:
        return problem
    eid = event.get(EVENT_ID)
    if eid is not None and not isinstance(eid, str):
        return EVENT_ID, f"must be a string, got {_kind(eid)}"
    rows.event_id[i] = eid
    return None


def _json_fields(event: dict, tasks: list[str]) -> tuple[str, str] | None:
    """A required field missing, or an unknown one."""
    for name in REQUIRED:
        if name not in event:
            return name, "required"
    known = {*REQUIRED, *INT_FIELDS, *IGNORED, LABELS, EVENT_ID}
    unknown = [k for k in event if k not in known]
    if unknown:
        hint = f" (labels go in {LABELS!r})" if unknown[0] in tasks else ""
        return _short(str(unknown[0])), f"unknown field{hint}"
    return None


def _json_ints(event: dict, i: int, rows: _Rows) -> tuple[str, str] | None:
    for name in INT_FIELDS:
        if name in event:
            value = event[name]
            if type(value) is not int:
                return name, f"must be an integer, got {_kind(value)}"
            if not INT64_MIN <= value <= INT64_MAX:
                return name, "outside the int64 range"
            rows.ints[name][i] = value
    return None


def _json_time(value: object) -> int | str:
    """int µs since the epoch, or the problem as a message."""
    if type(value) is int:
        return value if INT64_MIN <= value <= INT64_MAX else "outside the int64 range"
    if not isinstance(value, str):
        return ("must be an ISO-8601 time with a zone, or integer microseconds since the "
                f"epoch, got {_kind(value)}")
    return _iso_us(value)


def _iso_us(text: str) -> int | str:
    """An ISO-8601 time with a zone -> int µs since the epoch, or the problem as a message."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return "not an ISO-8601 time (e.g. 2026-01-05T10:00:00Z)"
    if when.tzinfo is None:
        return "has no time zone (add Z or +hh:mm: without one its instant is ambiguous)"
    return to_us(when)


def _json_labels(labels: object, i: int, rows: _Rows, tasks: list[str]) -> tuple[str, str] | None:
    if labels is None:
        return None
    if not isinstance(labels, dict):
        return LABELS, f"must be an object {{task: number}}, got {_kind(labels)}"
    for name, value in labels.items():
        if name not in rows.labels:
            return f"{LABELS}.{_short(str(name))}", f"not a task of the dataset (tasks: {', '.join(tasks)})"
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{LABELS}.{name}", f"must be a number or null, got {_kind(value)}"
        try:
            rows.labels[name][i] = float(value)
        except OverflowError:  # an integer beyond a double
            return f"{LABELS}.{name}", "must be a finite number (or null / absent when missing)"
    return None


# --- the file face: a DataFrame in the canonical schema ---------------------------------------


def _from_frame(df: pd.DataFrame, tasks: list[str]) -> _Rows:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise Invalid(f"events lack columns {missing} (have: {list(df.columns)})")
    known = {*REQUIRED, *INT_FIELDS, *IGNORED, EVENT_ID, *tasks}
    unknown = [str(c) for c in df.columns if c not in known]
    if unknown:
        raise Invalid(f"columns {unknown} are neither canonical event columns nor tasks of the "
                      f"dataset (tasks: {tasks})")
    rows = _Rows.empty(len(df), tasks, "")
    for name in INT_FIELDS:
        if name in df.columns:
            rows.ints[name] = _int_column(df[name], name, rows)
    rows.ts_us = _time_column(df[EVENT_TIMESTAMP], rows)
    surface = df["surface"].to_numpy(object)
    text = np.array([isinstance(x, str) for x in surface], dtype=bool)
    rows.reject(~text, "surface", "required: a string")
    rows.surface = np.where(text, surface, "")
    for task in tasks:
        if task in df.columns:
            rows.labels[task] = _label_column(df[task], task, rows)
    if EVENT_ID in df.columns:
        ids = df[EVENT_ID].to_numpy(object)
        absent = pd.isna(ids)
        text = np.array([isinstance(x, str) for x in ids], dtype=bool)
        rows.reject(~absent & ~text, EVENT_ID, "must be a string")
        rows.event_id = np.where(text, ids, None)
    return rows


def _int_column(values: pd.Series, name: str, rows: _Rows) -> np.ndarray:
    """int64 [n]; rows that are not whole numbers in int64's range are rejected (0 there)."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise Invalid(f"{name} holds booleans ({values.dtype}), not integers")
    if pd.api.types.is_integer_dtype(values.dtype) and not values.isna().any():
        if values.dtype.kind == "u" and len(values) and int(values.max()) > INT64_MAX:
            bad = (values > INT64_MAX).to_numpy()
            rows.reject(bad, name, "outside the int64 range")
            return np.where(bad, 0, values.to_numpy(np.uint64)).astype(np.int64)
        return values.to_numpy(np.int64)
    out = np.zeros(len(values), dtype=np.int64)
    bad = np.zeros(len(values), dtype=bool)
    for i, x in enumerate(values.to_numpy(object).tolist()):
        v = _whole(x)
        if v is None:
            bad[i] = True
        else:
            out[i] = v
    rows.reject(bad, name, "must be a whole number in the int64 range")
    return out


def _whole(x: object) -> int | None:
    """x as an int when it is a whole number in int64's range (text "12" included)."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, str):
        try:
            x = int(x.strip())
        except ValueError:
            return None
    if isinstance(x, float | np.floating):
        if not math.isfinite(x) or x != int(x):
            return None
        x = int(x)
    if isinstance(x, int | np.integer) and INT64_MIN <= int(x) <= INT64_MAX:
        return int(x)
    return None


def _time_column(ts: pd.Series, rows: _Rows) -> np.ndarray:
    """int64 µs [n] from a tz-aware timestamp column or ISO-8601 text with zones. Naive
    timestamps and numbers are refused as a whole (Invalid); bad text per row."""
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        missing = ts.isna().to_numpy()
        rows.reject(missing, EVENT_TIMESTAMP, "required")
        return np.where(missing, 0, timestamps_us(ts.fillna(pd.Timestamp(0, tz="UTC"))))
    if pd.api.types.is_datetime64_dtype(ts.dtype):
        raise Invalid(f"{EVENT_TIMESTAMP} has no time zone ({ts.dtype}): its instants are "
                      "ambiguous; localize it (e.g. col.dt.tz_localize('UTC')) or write ISO-8601 "
                      "times with a zone")
    if pd.api.types.is_numeric_dtype(ts.dtype) or pd.api.types.is_bool_dtype(ts.dtype):
        raise Invalid(f"{EVENT_TIMESTAMP} holds numbers ({ts.dtype}), not timestamps: a file's "
                      "epoch numbers are refused (their unit is ambiguous); write a tz-aware "
                      "timestamp column or ISO-8601 times with a zone")
    out = np.zeros(len(ts), dtype=np.int64)
    for i, x in enumerate(ts.to_numpy(object).tolist()):
        if isinstance(x, str):
            v = _iso_us(x)
        elif isinstance(x, datetime):  # datetime and pd.Timestamp objects
            v = to_us(x) if x.tzinfo is not None else "has no time zone"
        elif x is None or x is pd.NaT or (isinstance(x, float) and math.isnan(x)):
            v = "required: an ISO-8601 time with a zone"
        else:
            v = "not a time"
        if isinstance(v, str):
            rows.problems.setdefault(i, Rejected(i, EVENT_TIMESTAMP, v))
        else:
            out[i] = v
    return out


def _label_column(values: pd.Series, task: str, rows: _Rows) -> np.ndarray:
    """float64 [n], NaN where missing; a value that is not a number is rejected."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise Invalid(f"label column {task} holds booleans ({values.dtype}), not numbers")
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.to_numpy(np.float64, na_value=np.nan)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = np.isnan(numbers) & ~values.isna().to_numpy()
    rows.reject(bad, task, "must be a number (or empty when missing)")
    return np.where(bad, np.nan, numbers)
