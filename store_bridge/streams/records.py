"""Events on the wire: event ids, and record batches as stream entry payloads.

A stream entry carries one record batch (many events) as Arrow IPC bytes, not one event per
entry: a Python producer then pays one XADD per batch instead of one per event, which is what
lets ingestion reach tens of thousands of events per second on a small machine. Every event in
a batch keeps its own `event_id`, which is what consumers deduplicate on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

EVENT_ID = "event_id"
# Derived ids start with this; a client's own id may not, so the two can never collide.
DERIVED_PREFIX = "c-"
MAX_EVENT_ID_LEN = 128


def content_ids(
    user_id: np.ndarray, item_id: np.ndarray, ts_us: np.ndarray, surface: np.ndarray,
    action: np.ndarray,
) -> np.ndarray:
    """object [n]: an id derived from each event's content, so that the same event sent twice
    gets the same id: a 64-bit hash (pandas' `hash_pandas_object`) of (user, item, time in µs,
    surface, action), written `c-<16 hex digits>`. Labels are not part of it: a second copy of
    an event with other labels is the same event, not a new one."""
    n = len(user_id)
    if n == 0:
        return np.zeros(0, dtype=object)
    # Each column hashed on its own with fixed dtypes (pandas' `hash_array`: SipHash of the
    # values), then combined in order: no DataFrame is built (a lookup logs through here).
    parts = [
        np.asarray(user_id, dtype=np.int64), np.asarray(item_id, dtype=np.int64),
        np.asarray(ts_us, dtype=np.int64),
        np.asarray(surface, dtype=object),  # names (str)
        np.asarray(action, dtype=np.int64),
    ]  # fmt: skip
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in parts:
            h = (h * _MIX) ^ pd.util.hash_array(col, categorize=False).astype(np.uint64)
    return np.array([f"{DERIVED_PREFIX}{x:016x}" for x in h.tolist()], dtype=object)


# An odd 64-bit multiplier (FNV-1a's prime) that spreads one column's hash before the next.
_MIX = np.uint64(0x100000001B3)


def id_hashes(ids: np.ndarray) -> np.ndarray:
    """uint64 [n]: a stable 64-bit hash of each event id (stored beside history rows, so that
    two events with the same item and time stay two rows)."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(np.asarray(ids, dtype=object)).astype(np.uint64)


def encode_batch(table: pa.Table) -> bytes:
    """A table -> Arrow IPC stream bytes (schema included, so readers need no side channel)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_batch(payload: bytes) -> pa.Table:
    """Arrow IPC stream bytes -> the table. Raises pyarrow.ArrowInvalid on corrupt bytes."""
    with pa.ipc.open_stream(pa.py_buffer(payload)) as reader:
        return reader.read_all()
