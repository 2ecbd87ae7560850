"""Served impressions, buffered in memory and appended to the impressions stream in batches.

A lookup must not pay a Redis round trip to log what it served: it hands its impressions to an
`ImpressionBuffer` (a list append under a lock, microseconds), and one background thread
appends everything buffered as one record batch every `flush_interval_s` (Kafka producers'
`linger.ms`, the same trade).

Nothing is dropped silently:
- a flush that fails (Redis down, the stream full) keeps its rows and retries them, oldest
  first, after a pause;
- the buffer is bounded (`max_rows`): past it, `submit` refuses and returns False, and the
  caller counts those impressions as not logged (a metric);
- `close()` (the server's shutdown) flushes what is left.
What a process killed outright (SIGKILL) held in memory is lost: at most the last
`flush_interval_s` of impressions while the stream accepts appends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import redis

from store_bridge.events.schema import EVENT_TIMESTAMP
from store_bridge.streams.records import EVENT_ID, content_ids
from store_bridge.streams.stream import RedisStream, StreamFull

log = logging.getLogger("foundex.streams")

# The action id impressions' content ids are derived with: not an engagement (those are >= 0),
# so an impression's id never equals the id of an event with the same keys.
IMPRESSION_ACTION = -1
WARN_EVERY_S = 10.0


@dataclass
class _Request:
    user_id: int
    items: np.ndarray  # int64 [n]
    ts_us: int
    surface: str
    fm_version: str | None
    expert: str | None


def impression_table(requests: list[_Request]) -> pa.Table:
    """Requests' served impressions as one record batch, one row per (request, item).

    Columns: event_id (content id of user, item, request time, surface, IMPRESSION_ACTION),
    user_id, item_id int64, event_timestamp timestamp[us, UTC] (the request time), surface, and
    for traceability fm_version and expert (null when not given)."""
    sizes = np.array([len(r.items) for r in requests], dtype=np.int64)
    n = int(sizes.sum())
    users = np.repeat(np.array([r.user_id for r in requests], dtype=np.int64), sizes)
    times = np.repeat(np.array([r.ts_us for r in requests], dtype=np.int64), sizes)
    items = np.concatenate([r.items for r in requests]) if requests else np.zeros(0, np.int64)
    surfaces = np.repeat(np.array([r.surface for r in requests], dtype=object), sizes)
    ids = content_ids(users, items, times, surfaces, np.full(n, IMPRESSION_ACTION))

    def column(values: list[str | None]) -> pa.Array:
        return pa.array(np.repeat(np.array(values, dtype=object), sizes), pa.string())

    return pa.table(
        {
            EVENT_ID: pa.array(ids, pa.string()),
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            EVENT_TIMESTAMP: pa.array(times, pa.timestamp("us", tz="UTC")),
            "surface": pa.array(surfaces, pa.string()),
            "fm_version": column([r.fm_version for r in requests]),
            "expert": column([r.expert for r in requests]),
        }
    )


def distinct(item_ids: np.ndarray) -> np.ndarray:
    """int64 [k]: the ids once each, in order of first appearance (a repeated candidate is one
    impression)."""
    items = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    return items[np.sort(np.unique(items, return_index=True)[1])]


def impression_batch(
    user_id: int, item_ids: np.ndarray, ts_us: int, surface: str, *,
    fm_version: str | None = None, expert: str | None = None,
) -> pa.Table:  # fmt: skip
    """One request's served impressions as a record batch (see `impression_table`); repeated
    item ids are one impression."""
    items = distinct(item_ids)
    return impression_table([_Request(int(user_id), items, int(ts_us), surface, fm_version, expert)])


@dataclass
class BufferStats:
    submitted: int = 0  # impressions taken in
    appended: int = 0  # impressions appended to the stream
    refused: int = 0  # impressions refused: the buffer was full
    failed_flushes: int = 0


class ImpressionBuffer:
    """See the module docstring. Thread-safe; the flusher thread starts on the first submit."""

    def __init__(
        self, stream: RedisStream, *, flush_interval_s: float = 0.02, max_rows: int = 200_000,
        max_batch_rows: int = 20_000, retry_after_s: float = 1.0,
    ) -> None:  # fmt: skip
        self.stream = stream
        self.flush_interval_s, self.max_rows = float(flush_interval_s), int(max_rows)
        self.max_batch_rows, self.retry_after_s = int(max_batch_rows), float(retry_after_s)
        self.stats = BufferStats()
        self._pending: list[_Request] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time (thread or close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_at = -math.inf
        self._closed = False

    @property
    def pending_rows(self) -> int:
        return self._rows

    def submit(
        self, user_id: int, item_ids: np.ndarray, ts_us: int, surface: str, *,
        fm_version: str | None = None, expert: str | None = None,
    ) -> bool:  # fmt: skip
        """Buffer one request's impressions (item ids int64 [n], repeats are one impression;
        ts_us: the request time, µs since the epoch) -> False when the buffer is full (the
        caller counts them as not logged)."""
        items = distinct(item_ids)
        req = _Request(int(user_id), items, int(ts_us), surface, fm_version, expert)
        with self._lock:
            if self._rows + len(items) > self.max_rows:
                self.stats.refused += len(items)
                refused = True
            else:
                self._pending.append(req)
                self._rows += len(items)
                self.stats.submitted += len(items)
                refused = False
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="foundex-impressions", daemon=True
                )
                self._thread.start()
        if refused:
            self._warn(f"impression buffer full ({self.max_rows} rows waiting for the stream)")
        return not refused

    def flush(self) -> bool:
        """Append everything buffered now -> True when nothing is left buffered. On a full
        stream or a Redis error the rows stay buffered (for the next flush), the error is
        logged, and False is returned."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            while batch:
                take, size = 0, 0
                while take < len(batch) and (take == 0 or size + len(batch[take].items)
                                             <= self.max_batch_rows):  # fmt: skip
                    size += len(batch[take].items)
                    take += 1
                try:
                    self.stream.append(impression_table(batch[:take]))
                except (StreamFull, redis.RedisError) as e:
                    self.stats.failed_flushes += 1
                    with self._lock:  # back in front, in order
                        self._pending = batch + self._pending
                    self._warn(f"{type(e).__name__}: {e}")
                    return False
                batch = batch[take:]
                with self._lock:
                    self._rows -= size
                self.stats.appended += size
            return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the flusher and flush what is left (within `timeout_s` of retries); what
        still cannot be appended is logged as lost, with its count."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(self.retry_after_s, 0.2))
        if self._rows:
            log.error("impressions lost at shutdown", extra={"fields": {"impressions": self._rows}})

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            if self._stop.is_set():
                return
            try:
                if not self.flush():
                    self._stop.wait(self.retry_after_s)
            except Exception:  # never let the flusher die: the rows stay buffered
                log.exception("impression flush failed")
                self._stop.wait(self.retry_after_s)

    def _warn(self, error: str) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        log.warning(
            "impressions not appended yet",
            extra={"fields": {"buffered": self._rows, "refused": self.stats.refused,
                              "error": error}},
        )  # fmt: skip
