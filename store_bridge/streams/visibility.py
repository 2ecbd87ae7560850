"""Event-to-TAE visibility: how long after an event enters the events stream a TAE served for
its user reflects it.

One probe: compute a user's TAEs at a fixed request time (the baseline), append one new event
of that user (just before that time) to the events stream, then compute again at the same
request time until the TAEs differ from the baseline. Between the two lie the stream append,
the `histories` consumer's read and history write, and the serving tier's Redis read, cache
check and forward pass: the whole live path. The request time is held fixed, so nothing but
the event can change the TAEs.

The probe events are real events (canonical schema, their own ids, no labels): every consumer
group of the stream sees them, the offline log included. Run it on a demo or bench repo, not
on one whose history matters.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from fm.timefeatures import to_us
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, event_arrow_schema, local_hours
from store_bridge.fm_tier import FMTier
from store_bridge.repo import FMVersion
from store_bridge.streams.consumer import StreamConsumer
from store_bridge.streams.records import EVENT_ID
from store_bridge.streams.stream import RedisStream


@dataclass
class Visibility:
    """Probe latencies in seconds (from just before the append to the first TAE that
    reflects the event), in probe order, and how often the consumer lost Redis meanwhile
    (a healthy run: 0)."""

    latencies_s: list[float] = field(default_factory=list)
    consumer_reconnects: int = 0

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the latencies; NaN without any."""
        return float(np.quantile(self.latencies_s, q)) if self.latencies_s else float("nan")

    @property
    def p50(self) -> float:
        return self.quantile(0.5)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)


def probe_event(spec: DatasetSpec, user_id: int, item_id: int, surface: str, ts_us: int) -> pa.Table:
    """One event in the canonical schema (no labels: NaN for every task; action 0) with an id
    of its own -> a one-row table for `RedisStream.append`. ValueError for a surface outside
    the spec."""
    if surface not in spec.surfaces:
        raise ValueError(f"unknown surface {surface!r}; the dataset has {spec.surfaces}")
    ts = pd.Series(pd.to_datetime([int(ts_us)], unit="us", utc=True)).astype("datetime64[us, UTC]")
    frame = pd.DataFrame({
        "request_id": [-1], "user_id": [int(user_id)], "item_id": [int(item_id)],
        EVENT_TIMESTAMP: ts, "surface": [surface], "hour": local_hours(ts, spec.time_zone),
        "action": [0], **{t: [np.float32(np.nan)] for t in spec.all_tasks},
    })  # fmt: skip
    table = pa.Table.from_pandas(frame, schema=event_arrow_schema(spec.all_tasks), preserve_index=False)
    return table.append_column(EVENT_ID, pa.array([f"probe-{uuid.uuid4().hex}"]))


def visibility_latency(
    stream: RedisStream, tier: FMTier, version: FMVersion, spec: DatasetSpec, user_id: int,
    item_ids: np.ndarray, surface: str, *, event_item: int | None = None,
    timeout_s: float = 10.0, poll_s: float = 0.0002,
) -> float:  # fmt: skip
    """One probe (see the module docstring) -> seconds until a TAE reflects the new event.

    A `histories` consumer must be running on `stream` (`measure_visibility` runs one).
    `item_ids` are the request's candidates; the event's item is `event_item` (default: the
    first candidate) and its time is now, after the user's last stored event, so it enters
    the FM's window. The event must make the window differ: a user whose window holds only
    events like it (same item, action, surface, hour and time gaps) gets the same TAEs after
    it, and the probe times out; give successive probes of a user different items. Raises
    ValueError when the tier cannot compute the user (no engine, unknown user, no candidate
    in the vocabulary), TimeoutError when no reflecting TAE came within `timeout_s`."""
    items = np.asarray(item_ids, dtype=np.int64)
    ts_event = to_us(pd.Timestamp.now(tz="UTC").to_pydatetime())
    request_us = ts_event + 1  # the event is the newest one strictly before the request
    before = tier.compute(version, user_id, items, surface, request_us)
    if before is None or before.unknown_user or len(before.positions) == 0:
        raise ValueError(f"FM {version.version} computes no TAE for user {user_id} here")
    item = int(items[0]) if event_item is None else int(event_item)
    event = probe_event(spec, user_id, item, surface, ts_event)
    t0 = time.perf_counter()
    stream.append(event)
    while True:
        now = tier.compute(version, user_id, items, surface, request_us)
        if now is not None and not np.array_equal(now.taes, before.taes):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"no TAE of user {user_id} reflected the event after {timeout_s} s")
        time.sleep(poll_s)  # let the consumer thread have the interpreter


def measure_visibility(
    stream: RedisStream, consumer: StreamConsumer, tier: FMTier, version: FMVersion,
    spec: DatasetSpec, user_ids: list[int], item_ids: np.ndarray, surface: str, *,
    samples: int = 200, timeout_s: float = 10.0,
) -> Visibility:  # fmt: skip
    """`samples` probes, round-robin over `user_ids`, appended to `stream` (the producer's
    side; a user's successive probe events have different items, drawn from `item_ids`), with `consumer` (a `HistoriesConsumer` of that stream into the histories `tier`
    reads) running in a thread of this process for their duration. The consumer first
    catches up with what the stream already holds, so a backlog is not measured.

    Give the consumer a client of its own whose socket timeout exceeds its `block_ms`, as
    `foundex consume` does: on the service's client (80 ms) a blocking read times out, and
    the consumer takes that for a lost connection and backs off (`consumer_reconnects`).
    Raises as `visibility_latency` does; the consumer is stopped in any case."""
    if samples < 1 or not user_ids or len(np.unique(item_ids)) < 2:
        raise ValueError("measure_visibility needs samples >= 1, a user and two items")
    stream.ensure_groups()  # as a producer does: every declared group sees the probes
    reconnects = consumer.stats.reconnects
    consumer.drain()
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), name="visibility-histories")
    thread.start()
    out = Visibility()
    rng = np.random.default_rng(0)
    items = np.unique(np.asarray(item_ids, dtype=np.int64))
    last: dict[int, int] = {}
    try:
        for i in range(samples):
            user = int(user_ids[i % len(user_ids)])
            item = int(rng.choice(items[items != last.get(user, items[0] - 1)]))
            last[user] = item
            out.latencies_s.append(visibility_latency(
                stream, tier, version, spec, user, item_ids, surface, event_item=item,
                timeout_s=timeout_s,
            ))  # fmt: skip
    finally:
        stop.set()
        thread.join()
    out.consumer_reconnects = consumer.stats.reconnects - reconnects
    return out
