"""The stream foundation on a real Redis: dedup, bounded retention, lag, redelivery, restarts,
and the online histories' cap, idempotence and version counters."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import redis

from store_bridge.redis_server import _default_binary, _free_port, redis_client
from store_bridge.streams.consumer import StreamConsumer
from store_bridge.streams.histories import HistoriesConsumer, OnlineHistories
from store_bridge.streams.records import content_ids, decode_batch, encode_batch
from store_bridge.streams.stream import RedisStream, StreamFull

T0 = 1_700_000_000_000_000


def events(n: int, *, start: int = 0, users: int = 5, prefix: str = "e") -> pa.Table:
    idx = np.arange(start, start + n)
    df = pd.DataFrame(
        {
            "user_id": idx % users,
            "item_id": idx,
            "event_timestamp": pd.to_datetime(T0 + idx * 1_000_000, unit="us", utc=True),
            "surface": np.where(idx % 2 == 0, "home", "search"),
            "action": (idx % 3).astype(np.int16),
            "click": (idx % 2).astype(np.float32),
            "event_id": [f"{prefix}{i}" for i in idx],
        }
    )
    df["event_timestamp"] = df["event_timestamp"].astype("datetime64[us, UTC]")
    return pa.Table.from_pandas(df, preserve_index=False)


class Collect(StreamConsumer):
    group = "g1"

    def __init__(self, stream, **kw):
        super().__init__(stream, **kw)
        self.seen: list[str] = []

    def handle(self, entries):
        for e in entries:
            self.seen += e.table.column("event_id").to_pylist()


class Crash(Collect):
    def handle(self, entries):
        super().handle(entries)
        raise RuntimeError("killed between handle and ack")


@pytest.fixture
def stream_factory(redis_url):
    client = redis_client(redis_url, timeout=5)
    project = f"t{uuid.uuid4().hex[:8]}"

    def make(**kw) -> RedisStream:
        kw.setdefault("groups", ("g1", "g2"))
        s = RedisStream(client, project, "events", **kw)
        s.ensure_groups()
        return s

    yield make
    client.close()


def test_record_batch_round_trip_and_content_ids():
    t = events(7)
    assert decode_batch(encode_batch(t)).equals(t)
    a = content_ids(np.array([1, 1]), np.array([2, 2]), np.array([5, 5]), np.array(["s", "s"]),
                    np.array([0, 1]))  # fmt: skip
    b = content_ids(np.array([1], np.int32), np.array([2]), np.array([5]), np.array(["s"]),
                    np.array([0], np.int16))  # fmt: skip
    assert a[0] != a[1] and a[0] == b[0] and a[0].startswith("c-")


def test_dedup_within_and_across_batches(stream_factory):
    s = stream_factory()
    r1 = s.append(events(10))
    assert (r1.new, r1.duplicates) == (10, 0)
    both = pa.concat_tables([events(5, start=8), events(2, start=11)])  # 8, 9 seen; 11, 12 twice
    r2 = s.append(both)
    assert (r2.new, r2.duplicates) == (3, 2 + 2)
    assert r2.event_ids == [f"e{i}" for i in [8, 9, 10, 11, 12, 11, 12]]
    assert s.produced() == 13
    c = Collect(s)
    c.drain()
    assert sorted(c.seen, key=lambda x: int(x[1:])) == [f"e{i}" for i in range(13)]


def test_full_stream_refuses_and_trim_frees_only_acknowledged(stream_factory):
    s = stream_factory(max_entries=3)
    for i in range(3):
        s.append(events(2, start=2 * i))
    with pytest.raises(StreamFull, match="full"):
        s.append(events(2, start=100))
    Collect(s).drain()  # g1 acknowledged everything, g2 nothing: still full
    with pytest.raises(StreamFull):
        s.append(events(2, start=100))
    assert s.length() == 3

    class G2(Collect):
        group = "g2"

    G2(s).drain()
    r = s.append(events(2, start=100))  # the append trims what both groups acknowledged
    assert r.new == 2 and s.length() == 1


def test_lag_counts_unacknowledged_events_per_group(stream_factory):
    s = stream_factory()
    s.append(events(4))
    s.append(events(6, start=4))
    Collect(s).drain()
    lag = {g.group: g for g in s.lag()}
    assert lag["g1"].events == 0 and lag["g1"].pending_entries == 0
    assert lag["g2"].events == 10 and lag["g2"].oldest_unacked_s >= 0


def test_unacknowledged_entries_come_back_to_a_restarted_consumer(stream_factory):
    s = stream_factory()
    s.append(events(3))
    crashing = Crash(s)
    with pytest.raises(RuntimeError):
        crashing.drain()
    assert s.lag()[0].pending_entries == 1
    again = Collect(s)  # same consumer name: reads its own pending list first
    again.drain()
    assert again.seen == ["e0", "e1", "e2"]
    assert {g.group: g.events for g in s.lag()}["g1"] == 0


def test_idle_entries_of_a_dead_consumer_are_claimed(stream_factory):
    s = stream_factory()
    s.append(events(3))
    with pytest.raises(RuntimeError):
        Crash(s, consumer="worker-a").drain()
    other = Collect(s, consumer="worker-b", claim_idle_ms=1)
    time.sleep(0.01)
    other.drain()
    assert other.seen == ["e0", "e1", "e2"]


def _redis_on(port: int, data_dir, binary: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis_client(url, timeout=0.2).ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def test_consumer_resumes_after_a_real_redis_restart(tmp_path):
    binary = os.environ.get("FOUNDEX_TEST_REDIS_SERVER") or _default_binary()
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = _redis_on(port, tmp_path, binary)
    try:
        s = RedisStream(redis_client(url, timeout=2), "restart", "events", groups=("g1",))
        s.ensure_groups()
        s.append(events(5))
        c = Collect(s, block_ms=50)
        stop = threading.Event()
        t = threading.Thread(target=c.run, args=(stop,), kwargs={"max_backoff_s": 0.2})
        t.start()
        deadline = time.monotonic() + 10
        while len(c.seen) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(c.seen) == 5
        proc.terminate()  # SIGTERM: redis-server writes its append-only file and exits
        proc.wait(10)
        time.sleep(0.3)  # the consumer meets a dead server meanwhile
        proc = _redis_on(port, tmp_path, binary)
        RedisStream(redis_client(url, timeout=2), "restart", "events").append(events(5, start=5))
        deadline = time.monotonic() + 15
        while len(c.seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join(5)
        assert sorted(c.seen, key=lambda x: int(x[1:])) == [f"e{i}" for i in range(10)]
        assert c.stats.reconnects >= 1
        assert {g.group: g.events for g in s.lag()}["g1"] == 0  # acks survived the restart
    finally:
        proc.terminate()
        proc.wait(10)


def test_online_histories_cap_idempotence_and_versions(redis_url):
    client = redis_client(redis_url, timeout=5)
    h = OnlineHistories(client, f"h{uuid.uuid4().hex[:8]}", ["home", "search"], cap=4)
    t = events(30, users=3)
    assert h.add(t) == 12  # the newest 4 of each of 3 users survive the cap
    v0 = h.read(0).version
    assert h.add(t) == 0  # same event ids: nothing new
    assert h.read(0).version == v0  # nor for events the cap had dropped
    one = h.read(0)
    assert len(one) == 4  # the newest 4 of user 0's 10 events
    assert list(one.item) == [18, 21, 24, 27]
    assert np.all(np.diff(one.ts_us) > 0)
    assert list(one.surface) == [0, 1, 0, 1]
    assert list(one.action) == [0, 0, 0, 0]
    h.add(events(1, start=30, users=3))  # user 0 again
    assert h.read(0).version == v0 + 1 and list(h.read(0).item)[-1] == 30
    hist, versions = h.histories_for(np.array([2, 0, 99]))
    assert list(hist.users) == [0, 2] and versions[99] == 0 and not h.knows(99)
    with pytest.raises(ValueError, match="unknown surfaces"):
        h.add(events(1).set_column(3, "surface", pa.array(["nowhere"])))


def test_backfill_keeps_newest_and_consumer_matches(redis_url):
    client = redis_client(redis_url, timeout=5)
    project = f"b{uuid.uuid4().hex[:8]}"
    df = events(40, users=4).to_pandas().drop(columns=["event_id"])
    h = OnlineHistories(client, project, ["home", "search"], cap=3)
    assert h.backfill(df) == 12 and h.backfill(df) == 0
    assert list(h.read(1).item) == [29, 33, 37]
    # The same events through the stream and the histories consumer: same rows, nothing new.
    s = RedisStream(client, project, "events", groups=("histories",))
    s.ensure_groups()
    t = pa.Table.from_pandas(df, preserve_index=False)
    ids = content_ids(df.user_id, df.item_id, df.event_timestamp.astype("int64"), df.surface,
                      df.action)  # fmt: skip
    s.append(t.append_column("event_id", pa.array(ids)))
    HistoriesConsumer(s, h).drain()
    assert list(h.read(1).item) == [29, 33, 37]


def test_events_at_one_instant_come_back_in_the_event_logs_order(redis_url):
    from fm.history import UserHistories

    client = redis_client(redis_url, timeout=5)
    h = OnlineHistories(client, f"o{uuid.uuid4().hex[:8]}", ["home", "search"], cap=50)
    df = pd.DataFrame(
        {
            "user_id": np.zeros(8, dtype=np.int64),
            "item_id": [7, -3, 300, 7, 2**40, 0, 7, 5],
            "event_timestamp": pd.to_datetime([T0] * 6 + [T0 + 1, T0 - 1], unit="us", utc=True)
            .astype("datetime64[us, UTC]"),
            "surface": ["search", "home", "home", "home", "home", "search", "home", "home"],
            "action": np.array([1, 0, 2, 1, 0, 3, 0, 0], dtype=np.int16),
        }
    )
    h.add(df)
    online = h.read(0)
    offline = UserHistories.from_events(df.sample(frac=1, random_state=3), ["home", "search"])
    np.testing.assert_array_equal(online.ts_us, offline.ts_us)
    np.testing.assert_array_equal(online.item, offline.item)
    np.testing.assert_array_equal(online.action, offline.action)
    np.testing.assert_array_equal(online.surface, offline.surface)
    assert list(online.item[1:7]) == [-3, 0, 7, 7, 300, 2**40]


def test_clear_and_delete_start_afresh(stream_factory, redis_url):
    s = stream_factory()
    s.append(events(4))
    Collect(s).drain()
    s.delete()
    assert s.length() == 0 and s.produced() == 0 and s.lag() == []
    fresh = stream_factory()  # same project: the seen ids went too
    assert fresh.append(events(4)).new == 4
    client = redis_client(redis_url, timeout=5)
    h = OnlineHistories(client, f"c{uuid.uuid4().hex[:8]}", ["home", "search"], cap=8)
    h.add(events(6, users=2))
    assert h.clear() == 4 and not h.knows(0) and h.read(1).version == 0


def test_rows_of_another_layout_are_refused_with_a_clear_error(redis_url):
    client = redis_client(redis_url, timeout=5)
    h = OnlineHistories(client, f"l{uuid.uuid4().hex[:8]}", ["home", "search"])
    client.zadd(h.key(1), {b"\x00" * 12: 5.0})
    with pytest.raises(ValueError, match="another foundex layout"):
        h.read(1)


def test_a_blocking_read_stays_inside_the_clients_timeout(redis_url):
    s = RedisStream(redis_client(redis_url, timeout=0.08), "t", f"b{uuid.uuid4().hex[:6]}",
                    groups=("g1",))  # fmt: skip
    assert Collect(s, block_ms=500).block_ms == 40  # half the socket timeout
    assert Collect(s, block_ms=10).block_ms == 10
