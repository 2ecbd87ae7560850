"""Point-in-time-correct training sets.

Each label row (user, item, time) gets, from the pinned FM version's offline TAEs, the latest
embedding whose event time is <= the row's time and no older than the view's TTL: never a later
one. This is the rule of Feast's `get_historical_features`, which the tests compare against.

The join is an as-of search in NumPy over the key columns alone: key tuples ranked among the
table's (a lookup table when the values are dense), offline rows sorted once by (entity, time),
and every label row's latest time found within its entity's run, all rows in lockstep. It
yields which offline row (file, row number) holds each row's embedding; the vectors are then
gathered from just those files, so the wide embeddings never go through a join. Feast's
DuckDB-backed `get_historical_features` gives the same rows; `foundex bench store` times both.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fm.timefeatures import arrow_timestamps_us, as_microseconds, timestamps_us, to_us
from store_bridge.events.schema import EVENT_TIMESTAMP, ITEM_FEATURES
from store_bridge.repo import FeatureRepo, FMVersion

# Label times foundex accepts: from the epoch to where nanosecond timestamps end (Feast's
# get_historical_features and pandas work in nanoseconds), so an accepted row joins anywhere.
EARLIEST_US = 0
LATEST_US = to_us(pd.Timestamp("2262-04-11", tz="UTC"))
# A UTC offset after the time of day (a date's "-05" is not one).
_OFFSET = r"[Tt ]\d\d(?::?\d\d(?::?\d\d(?:[.,]\d+)?)?)?\s*(?:[zZ]|[+-]\d\d(?::?\d\d)?)$"


def label_timestamps(ts: pd.Series, first_row: int = 0) -> tuple[pd.Series, str | None]:
    """Validate a label-row time column -> (datetime64[us, UTC] series, note or None).

    Accepted: timestamps with a time zone (converted to UTC); timestamps without one, and
    ISO 8601 strings without an offset, taken as UTC (the note says so). Raises ValueError
    (one line, naming the row) for numbers (an epoch's unit is ambiguous), other text,
    missing values, and times before 1970-01-01 or from 2262-04-11 on. `first_row`: the
    input row number of `ts`'s first value (a batch of a longer file), for those messages.
    """
    note = None
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        out = as_microseconds(ts)
    elif pd.api.types.is_datetime64_dtype(ts.dtype):
        out = as_microseconds(ts)
        note = f"{EVENT_TIMESTAMP} has no time zone; its times are taken as UTC"
    elif pd.api.types.is_numeric_dtype(ts.dtype) or pd.api.types.is_bool_dtype(ts.dtype):
        raise ValueError(
            f"{EVENT_TIMESTAMP} holds numbers ({ts.dtype}), not timestamps; epoch numbers are "
            "refused because their unit is ambiguous: convert them, e.g. "
            "pd.to_datetime(col, unit='s', utc=True)"
        )
    else:
        out, note = _parse_text_times(ts, first_row)
    missing = out.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{EVENT_TIMESTAMP} is missing on {int(missing.sum()):,} of {len(missing):,} rows "
            f"(first: row {first_row + int(np.argmax(missing))})"
        )
    us = timestamps_us(out)
    bad = (us < EARLIEST_US) | (us >= LATEST_US)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{EVENT_TIMESTAMP} {out.iloc[i].isoformat()} (row {first_row + i}) is outside the "
            f"supported range 1970-01-01 .. 2262-04-10 UTC ({int(bad.sum()):,} of {len(us):,} rows)"
        )
    return out, note


def _parse_text_times(ts: pd.Series, first_row: int = 0) -> tuple[pd.Series, str | None]:
    text = ts.astype("string").str.strip()
    numeric = text.str.fullmatch(r"[+-]?\d+(\.\d*)?").fillna(False).to_numpy(bool)
    if numeric.any():
        i = int(np.argmax(numeric))
        raise ValueError(
            f"{EVENT_TIMESTAMP} value {ts.iloc[i]!r} (row {first_row + i}) is a number; epoch "
            "numbers are refused because their unit is ambiguous: give ISO 8601 times or timestamps"
        )
    # Times with and without an offset are parsed apart: in one call pandas applies the
    # offset of an earlier string to the offset-less ones after it.
    has_offset = text.str.contains(_OFFSET, regex=True).fillna(False).to_numpy(bool)
    values = np.full(len(ts), np.datetime64("NaT"), dtype="datetime64[us]")
    for mask in (has_offset, ~has_offset):
        rows = np.flatnonzero(mask)
        if len(rows):
            parsed = _parse_iso(text.iloc[rows], rows, ts, first_row)
            values[rows] = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
    out = pd.Series(values, index=ts.index).dt.tz_localize("UTC")
    naive = int((~has_offset & text.notna().to_numpy(bool)).sum())
    note = (
        f"{EVENT_TIMESTAMP}: {naive:,} of {len(text):,} times have no offset; taken as UTC"
        if naive else None
    )
    return out, note


def _parse_iso(
    text: pd.Series, rows: np.ndarray, original: pd.Series, first_row: int = 0
) -> pd.Series:
    """ISO 8601 strings -> datetime64[us, UTC]; errors name the row in `original`."""
    try:
        return pd.to_datetime(text, utc=True, format="ISO8601").astype("datetime64[us, UTC]")
    except (ValueError, TypeError, OverflowError) as e:
        m = re.search(r"at position (\d+)", str(e))
        row = int(rows[int(m.group(1))]) if m else None
        where = f" (row {first_row + row}: {original.iloc[row]!r})" if row is not None else ""
        if isinstance(e, pd.errors.OutOfBoundsDatetime):
            raise ValueError(
                f"{EVENT_TIMESTAMP} holds a time outside the supported range 1970-01-01 .. "
                f"2262-04-10 UTC{where}"
            ) from None
        raise ValueError(
            f"{EVENT_TIMESTAMP} holds text that is not an ISO 8601 time{where}; "
            "use e.g. 2026-01-05T10:00:00Z or a timestamp column"
        ) from None


def _key_column(labels: pd.DataFrame, col: str, first_row: int = 0) -> np.ndarray:
    """An id column as int64; ValueError unless every value is a whole number (`first_row`:
    the input row number of the frame's first row, for the message)."""
    values = labels[col]
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        if values.isna().any():  # nullable Int64
            raise ValueError(f"{col} is missing on {int(values.isna().sum()):,} rows")
        return values.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(values.dtype):
        arr = values.to_numpy(np.float64)
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if whole.all():
            return arr.astype(np.int64)
        i = int(np.argmax(~whole))
        raise ValueError(
            f"{col} must hold whole numbers, got {float(arr[i])!r} (row {first_row + i})"
        )
    raise ValueError(f"{col} must hold integer ids, got {values.dtype}")


def check_label_columns(labels: pd.DataFrame, tasks: list[str]) -> None:
    """Raise ValueError (one line) unless `labels` has the key columns and a numeric label
    column for every one of `tasks` (NaN where a task does not apply)."""
    missing = [c for c in ("user_id", "item_id", EVENT_TIMESTAMP) if c not in labels.columns]
    if missing:
        raise ValueError(f"label rows lack columns {missing} (have: {list(labels.columns)})")
    absent = [t for t in tasks if t not in labels.columns]
    if absent:
        raise ValueError(
            f"label rows lack label columns {absent} for the expert's tasks {tasks} "
            f"(have: {list(labels.columns)})"
        )
    text = [t for t in tasks if not pd.api.types.is_numeric_dtype(labels[t].dtype)]
    if text:
        raise ValueError(f"label columns {text} must be numeric (0/1, NaN where not applicable)")


def _offline_files(glob: Path) -> list[Path]:
    return sorted(glob.parent.parent.glob(f"{glob.parent.name}/{glob.name}"))


# A key column whose values span at most this many integers is ranked through a lookup
# table (one gather per row) instead of a sort and a binary search.
_DENSE_SPAN = 1 << 24
# Combined key ids stay below this so they fit one int64.
_KEY_BOUND = 2**62


def _ranks(tk: np.ndarray, rk: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Ranks of key values among the table's distinct values: the table's, each row's (-1: the
    value is not in the table), and how many distinct values there are."""
    lo, hi = int(tk.min()), int(tk.max())
    if hi - lo < max(_DENSE_SPAN, 4 * (len(tk) + len(rk))):
        seen = np.zeros(hi - lo + 1, dtype=bool)
        seen[tk - lo] = True
        rank = np.cumsum(seen, dtype=np.int32 if hi - lo < 2**31 else np.int64) - 1
        off = rk - lo
        inside = (off >= 0) & (off <= hi - lo)
        off = np.where(inside, off, 0)
        return rank[tk - lo], np.where(inside & seen[off], rank[off], -1), int(rank[-1]) + 1
    uniq = np.unique(tk)
    pos = np.minimum(np.searchsorted(uniq, rk), len(uniq) - 1)
    return np.searchsorted(uniq, tk), np.where(uniq[pos] == rk, pos, -1), len(uniq)


def _entity_ids(
    table_keys: list[np.ndarray], row_keys: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense ids of the table's key tuples (0 .. n-1), each row's id (-1: not in the table),
    and n."""
    t = np.zeros(len(table_keys[0]), dtype=np.int64)
    r = np.zeros(len(row_keys[0]), dtype=np.int64)
    span = 1
    for tk, rk in zip(table_keys, row_keys, strict=True):
        t_rank, r_rank, width = _ranks(np.asarray(tk, np.int64), np.asarray(rk, np.int64))
        if span * width >= _KEY_BOUND:  # re-rank the tuples so far to keep ids in int64
            t, r, span = _ranks(t, r)
        r = np.where((r < 0) | (r_rank < 0), -1, r * width + r_rank)
        t, span = t * width + t_rank, span * width
    return _ranks(t, r) if len(table_keys) > 1 else (t, r, span)


def asof_indices(
    table_keys: list[np.ndarray],
    table_ts: np.ndarray,
    row_keys: list[np.ndarray],
    row_ts: np.ndarray,
) -> np.ndarray:
    """For every row, the index of the table row with equal keys and the latest time <= the
    row's time, or -1. Ties on (keys, time) go to the table row that comes last."""
    n_table, n_rows = len(table_ts), len(row_ts)
    if n_table == 0 or n_rows == 0:
        return np.full(n_rows, -1, dtype=np.int64)
    t_ent, r_ent, n_ent = _entity_ids(table_keys, row_keys)
    table_ts, row_ts = np.asarray(table_ts, np.int64), np.asarray(row_ts, np.int64)
    # Table rows sorted by (entity, time), stably; each entity owns one run [first, end).
    order = np.lexsort((table_ts, t_ent))
    sorted_ts = table_ts[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(t_ent, minlength=n_ent))])
    ent = np.maximum(r_ent, 0)
    first = np.where(r_ent >= 0, bounds[ent], 0)
    end = np.where(r_ent >= 0, bounds[ent + 1], 0)
    # Every row's upper bound within its run at once, by binary lifting: try steps of 2^k
    # down to 1, taking a step while it stays in the run and on times <= the row's. A few
    # vectorized passes (log2 of the longest run) instead of a binary search over the whole
    # table per row; few large temporaries, which cost page faults at 1M rows.
    pos = first.copy()
    step = 1 << (int(np.diff(bounds).max()).bit_length() - 1)
    while step:
        cand = pos + step
        ok = cand <= end
        np.minimum(cand, n_table, out=cand)
        ok &= sorted_ts[cand - 1] <= row_ts
        np.copyto(pos, pos + step, where=ok)
        step >>= 1
    return np.where(pos > first, order[np.maximum(pos - 1, 0)], -1)


def read_items(items_path: Path, item_features: list[str]) -> pa.Table:
    """The item table's keys, times and `item_features` (one row per item and time)."""
    return pq.read_table(items_path, columns=["item_id", EVENT_TIMESTAMP, *item_features])


def item_rows(table: pa.Table, items: np.ndarray, ts_us: np.ndarray) -> np.ndarray:
    """For every label row (item id, time in µs), the row of `table` (see `read_items`) in
    force at that time, or -1."""
    return asof_indices(
        [table.column("item_id").to_numpy()], arrow_timestamps_us(table.column(EVENT_TIMESTAMP)),
        [items], ts_us,
    )


def item_feature_columns(
    table: pa.Table, hit: np.ndarray, item_features: list[str], widen: bool
) -> dict[str, np.ndarray]:
    """Feature values of the item rows `hit` (from `item_rows`), NaN where hit < 0. `widen`:
    every column as float64, which a training set needs as soon as one of its rows has no item
    row (the in-memory join decides it over all rows; the partitioned one, over all batches)."""
    picked = table.select(item_features).take(pa.array(np.maximum(hit, 0))).to_pandas()
    out = {}
    for c in item_features:
        col = picked[c].astype("float64" if widen else picked[c].dtype)
        col[hit < 0] = np.nan
        out[c] = col.to_numpy()
    return out


def point_in_time_join(
    labels: pd.DataFrame,
    *,
    tae_glob: Path | None,
    ttl_seconds: int | None,
    items_path: Path | None = None,
    item_features: list[str] = ITEM_FEATURES,
) -> pd.DataFrame:
    """Join label rows with TAEs (as `embedding`) and item features, point in time.

    `labels` needs user_id, item_id (whole numbers), event_timestamp (see `label_timestamps`:
    ValueError for numbers, missing values, times outside 1970..2262); other columns pass
    through. Output rows are
    in the input order; `embedding` is a float32 array (read-only, shared by rows that matched the
    same offline row), or None where no embedding is in range.
    """
    for col in ("user_id", "item_id", EVENT_TIMESTAMP):
        if col not in labels.columns:
            raise ValueError(f"label rows lack column {col!r}")
    out = labels.reset_index(drop=True)
    out[EVENT_TIMESTAMP], _ = label_timestamps(out[EVENT_TIMESTAMP])
    users = _key_column(out, "user_id")
    items = _key_column(out, "item_id")
    ts = timestamps_us(out[EVENT_TIMESTAMP])
    if items_path is not None and item_features:
        table = read_items(items_path, item_features)
        hit = item_rows(table, items, ts)
        for c, values in item_feature_columns(
            table, hit, item_features, widen=hit.min(initial=0) < 0
        ).items():
            out[c] = values
    if tae_glob is not None:
        embeddings = np.full(len(out), None, dtype=object)
        files = _offline_files(tae_glob)
        if files:
            keys = [pq.read_table(f, columns=["user_id", "item_id", EVENT_TIMESTAMP]) for f in files]
            sizes = np.array([k.num_rows for k in keys], dtype=np.int64)
            keys_t = pa.concat_tables(keys)
            t_ts = arrow_timestamps_us(keys_t.column(EVENT_TIMESTAMP))
            hit = asof_indices(
                [keys_t.column("user_id").to_numpy(), keys_t.column("item_id").to_numpy()],
                t_ts, [users, items], ts,
            )
            if ttl_seconds:  # Feast's rule: feature time + TTL >= row time
                hit[(hit >= 0) & (ts - t_ts[np.maximum(hit, 0)] > int(ttl_seconds) * 1_000_000)] = -1
            starts = np.concatenate([[0], np.cumsum(sizes)])
            fidx = np.where(hit >= 0, np.searchsorted(starts, hit, side="right") - 1, -1)
            frow = np.where(hit >= 0, hit - starts[np.maximum(fidx, 0)], -1)
            _gather_embeddings(files, fidx, frow, embeddings)
        out["embedding"] = embeddings
    return out


def _gather_embeddings(
    files: list[Path], fidx: np.ndarray, frow: np.ndarray, into: np.ndarray
) -> None:
    """Fill `into[k]` with the embedding in row frow[k] of files[fidx[k]] where fidx[k] >= 0."""
    # Label rows grouped by file with one stable sort (a radix sort on small file numbers),
    # rather than one pass over every row per file: a version may hold hundreds of files.
    rows = np.flatnonzero(fidx >= 0)
    keys = fidx[rows].astype(np.uint16 if len(files) < 2**16 else np.int64)
    perm = np.argsort(keys, kind="stable")
    order = rows[perm]
    bounds = np.searchsorted(keys[perm], np.arange(len(files) + 1))
    for f, path in enumerate(files):
        sel = order[bounds[f] : bounds[f + 1]]
        if len(sel) == 0:
            continue
        column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
        n = len(column)
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        lengths = np.diff(column.offsets.to_numpy())
        if column.null_count or len(flat) % n or (lengths != len(flat) // n).any():
            raise ValueError(f"{path}: embeddings are not all of one dimension")
        matrix = flat.reshape(n, len(flat) // n)
        matrix.setflags(write=False)  # rows are shared by every label row that matched them
        per_row = np.fromiter(matrix, dtype=object, count=n)  # one view per stored row
        into[sel] = per_row[frow[sel]]


def expert_training_set(
    repo: FeatureRepo,
    labels: pd.DataFrame,
    fm_version: FMVersion | None,
    item_features: list[str] = ITEM_FEATURES,
) -> pd.DataFrame:
    """The training set of an expert pinned to `fm_version` (None: the no-FM baseline)."""
    return point_in_time_join(
        labels,
        tae_glob=repo.tae_dir(fm_version.version) / "*" / "*.parquet" if fm_version else None,
        ttl_seconds=fm_version.ttl_seconds if fm_version else None,
        items_path=repo.data / "items.parquet",
        item_features=item_features,
    )
