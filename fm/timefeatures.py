"""Time features of the FM, derived one way for training, logging and serving, and the one
home of every conversion of an instant to int64 microseconds since the epoch (UTC):
`to_us` (one datetime), `timestamps_us` (a pandas column -> int64 array), `as_microseconds`
(a pandas column -> datetime64[us, UTC] column), `arrow_timestamps_us` (an Arrow column).
The store bridge, the experts and the API convert through these; importing this module
imports numpy and pandas only (never torch: the `fm` package loads its modules lazily).

Every hour-of-day the FM reads comes from `hour_of_day(ts_us, config.time_zone)`: history
tokens and targets alike, in `fm.batching.collate`, from the event's own microsecond UTC
timestamp. No caller passes an hour in, so a served TAE cannot use another hour than the
logged or trained one for the same instant. Event logs may keep an `hour` column for people
to read; the FM never reads it.

A time zone is one of:
  * "UTC" (the default; also "GMT", "Z");
  * a fixed offset from UTC: "+08:00", "-05:30", "UTC+8", "GMT-03:00" (|offset| < 24 h);
  * an IANA name, e.g. "Asia/Shanghai" or "America/New_York" (DST-aware, from the tz database).

Pure numpy/pandas, exact integer arithmetic on microseconds: instants before 1970 (negative
microseconds) take the floor, so -1 µs is 23:59:59.999999 of 1969-12-31, hour 23 in UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR
HOURS_PER_DAY = 24

_UTC_NAMES = {"UTC", "GMT", "Z"}
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)
# IANA rules are looked up (by pandas) for instants in years 1..9999; an instant outside that
# takes the offset at the nearest end of it. Zone rules that far out are guesses anyway.
_ZONE_LO = int(np.datetime64("0001-01-02", "us").astype(np.int64))
_ZONE_HI = int(np.datetime64("9999-12-30", "us").astype(np.int64))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@lru_cache(maxsize=64)
def _parse(time_zone: str) -> int | ZoneInfo:
    """A fixed offset in microseconds, or the ZoneInfo of an IANA name. ValueError if neither."""
    if not isinstance(time_zone, str) or not time_zone.strip():
        raise ValueError(f"time zone must be a non-empty string, got {time_zone!r}")
    tz = time_zone.strip()
    if tz.upper() in _UTC_NAMES:
        return 0
    m = _OFFSET.match(tz)
    if m:
        sign, hours, minutes = m.group(1), int(m.group(2)), int(m.group(3) or 0)
        if minutes >= 60 or hours * 60 + minutes >= 24 * 60:
            raise ValueError(f"time zone offset {time_zone!r} is out of range (|offset| < 24:00)")
        off = (hours * 60 + minutes) * 60 * US_PER_SECOND
        return -off if sign == "-" else off
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError, OSError) as e:  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(
            f"unknown time zone {time_zone!r}: use 'UTC', a fixed offset like '+08:00', "
            "or an IANA name like 'Asia/Shanghai'"
        ) from e


def check_time_zone(time_zone: str) -> str:
    """`time_zone` itself if it names a time zone this module reads; ValueError otherwise."""
    _parse(time_zone)
    return time_zone


def _as_us(ts_us: np.ndarray | int) -> np.ndarray:
    a = np.asarray(ts_us)
    if a.dtype.kind not in "iu":
        raise TypeError(f"timestamps must be integer microseconds since the epoch, got {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError("timestamps beyond int64 microseconds")
    return a.astype(np.int64, copy=False)


def utc_offset_us(ts_us: np.ndarray | int, time_zone: str = "UTC") -> np.ndarray:
    """Local time minus UTC at each instant, int64 microseconds, same shape as ts_us."""
    ts = _as_us(ts_us)
    zone = _parse(time_zone)
    if isinstance(zone, int):
        return np.full(ts.shape, zone, dtype=np.int64)
    flat = np.clip(ts.reshape(-1), _ZONE_LO, _ZONE_HI)
    utc = pd.DatetimeIndex(flat.astype("datetime64[us]")).tz_localize("UTC")
    local = utc.tz_convert(zone).tz_localize(None)
    off = np.asarray(local, dtype="datetime64[us]").view(np.int64) - flat
    return off.reshape(ts.shape)


def hour_of_day(ts_us: np.ndarray | int, time_zone: str = "UTC") -> np.ndarray:
    """Local hour of day in [0, 24) of each instant -> int64, same shape as ts_us.

    ts_us: int64 microseconds since 1970-01-01 UTC, any value (before 1970, far future).
    Floor, never truncation: an instant before 1970 gets the hour it fell in. Exact over the
    whole int64 range: each term is reduced modulo a day before adding, so nothing overflows.
    """
    ts = _as_us(ts_us)
    off = utc_offset_us(ts, time_zone)
    of_day = (ts % US_PER_DAY + off % US_PER_DAY) % US_PER_DAY  # numpy %: floor modulo
    return of_day // US_PER_HOUR


def to_us(when: datetime | pd.Timestamp) -> int:
    """An instant as int64 microseconds since the epoch, exactly (naive = UTC).

    Integer arithmetic: `int(dt.timestamp() * 1e6)` goes through a float and can land one
    microsecond off, and truncates towards zero before 1970.
    """
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)  # floor, also for pd.Timestamp


def iso_utc(time_us: int) -> str:
    """µs since the epoch -> ISO-8601 UTC to the millisecond (integer arithmetic: no float
    seconds)."""
    when = _EPOCH + timedelta(microseconds=int(time_us))
    return when.isoformat(timespec="milliseconds")


def timestamps_us(ts: pd.Series) -> np.ndarray:
    """A timestamp column as int64 microseconds since the epoch (UTC); naive values are UTC.

    Accepts datetime64 of any unit (naive or with a time zone), strings and datetime objects.
    Sub-microsecond parts are floored (also before 1970). Works over the whole microsecond
    range (years far outside pandas' nanosecond range 1677..2262 included).
    """
    ts = pd.Series(ts)
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    elif ts.dtype.kind != "M":
        try:
            ts = pd.to_datetime(ts, utc=True).dt.tz_localize(None)
        except pd.errors.OutOfBoundsDatetime:  # objects beyond the nanosecond range
            return np.array([to_us(pd.Timestamp(x)) for x in ts], dtype=np.int64)
    return ts.astype("datetime64[us]").to_numpy(dtype="datetime64[us]").view(np.int64)


def as_microseconds(ts: pd.Series) -> pd.Series:
    """A timestamp column as datetime64[us, UTC] (what Feast's DuckDB store accepts), same
    index and name.

    Naive values are taken as UTC; sub-microsecond parts are floored (before 1970 too);
    instants outside pandas' nanosecond range (years 1677..2262) keep their value."""
    if isinstance(ts.dtype, pd.DatetimeTZDtype):  # to_datetime would box ~1000 values to check
        return ts.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    if ts.dtype.kind == "M":  # naive datetime64 of any unit
        return ts.astype("datetime64[us]").dt.tz_localize("UTC")
    us = timestamps_us(ts)  # strings, datetime objects
    return pd.Series(us.astype("datetime64[us]"), index=ts.index, name=ts.name).dt.tz_localize(
        "UTC"
    )


def arrow_timestamps_us(column: Any) -> np.ndarray:
    """An Arrow timestamp column (Array or ChunkedArray, any unit) -> int64 microseconds."""
    import pyarrow as pa  # only callers holding Arrow data pay for it
    import pyarrow.compute as pc

    return pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy()
