"""Stale stored TAEs: a row stored (logged, written back) before its user's newest event is
computed again by read-through as of the request and written back; rows stored after it, and
rows of users without online history, are served as stored.

The store's stale report is checked on a single Redis (one script) and on a real three-node
cluster (per-node pipelines) against the same planted rows; the lookup on a copy of the tiny
demo repo under a Feast project of its own, its online histories seeded from its log, events
added through the events stream and the `histories` consumer (over REST in one test).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from api.app import create_app
from api.services.context import ServiceContext
from api.services.histories import backfill_histories
from api.services.lookup import lookup
from api.settings import Settings
from fm.timefeatures import to_us
from store_bridge.events.schema import DatasetSpec
from store_bridge.feast_layout import (
    decode_timestamp_us,
    encode_timestamp_us,
    entity_keys,
    feature_field,
    ts_field,
)
from store_bridge.online import NewestEvent, RedisEmbeddingStore
from store_bridge.repo import view_name
from store_bridge.streams.histories import HistoriesConsumer, OnlineHistories
from store_bridge.streams.records import EVENT_ID
from tests.conftest import LiveServer
from tests.test_online_histories import log_engine, new_event, own_repo
from tests.test_store_cluster import redis_cluster  # noqa: F401  (a fixture)

DIM, USER, T = 8, 42, 1_767_571_200_000_000  # T: 2026-01-05T00:00:00Z in µs
VIEW = view_name("v1")
EVENTS_KEY = "stale:hist:{42}"  # a user's event times, as online histories keep them


# --- the store's report --------------------------------------------------------------------


def plant(client, store: RedisEmbeddingStore, project: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of USER in every shape the stale report must tell apart -> (items, values).

    0: T-1, 1: T (not newer), 2: T+1, 3: a value without a time, 4: a garbage time,
    5: Feast's null with an old time, 6: undecodable bytes with an old time, 7: a key holding
    a string, 8: nothing stored, 9: T-1 again and 10: T+1 again (the script decodes each
    distinct time once: repeats must get the same verdict)."""
    items = np.arange(100, 111, dtype=np.int64)
    values = np.random.default_rng(3).normal(size=(len(items), DIM)).astype(np.float32)
    for i, t in [(0, T - 1), (1, T), (2, T + 1), (9, T - 1), (10, T + 1), (3, T), (4, T)]:
        store.write("v1", [USER], items[i : i + 1], [t], values[i : i + 1])
    keys = entity_keys(project, {"user_id": np.full(len(items), USER), "item_id": items})
    vfield, tfield = feature_field(VIEW, "embedding"), ts_field(VIEW)
    client.hdel(keys[3], tfield)
    client.hset(keys[4], tfield, b"\xff\x00garbage")
    client.hset(keys[5], mapping={vfield: b"", tfield: encode_timestamp_us(T - 10)})
    client.hset(keys[6], mapping={vfield: b"\x01\x02", tfield: encode_timestamp_us(T - 10)})
    client.set(keys[7], b"a string, not a hash")
    client.zadd(EVENTS_KEY, {b"a": T - 5, b"b": T, b"c": T + 50, b"d": T + 200})
    return items, values


def check_report(store: RedisEmbeddingStore, items: np.ndarray, values: np.ndarray) -> None:
    plain = store.read("v1", DIM, USER, items)
    rows = store.read("v1", DIM, USER, items, newer_than=T)
    assert plain.stale == [] and plain.newer_than_us is None
    assert rows.stale == [0, 1, 3, 4, 9] and rows.newer_than_us == T
    assert rows.missing == plain.missing == [5, 6, 7, 8]
    assert rows.undecodable == plain.undecodable == [6, 7]
    served = [0, 1, 2, 3, 4, 9, 10]  # stale rows are still read, as stored
    assert rows.matrix[served].tobytes() == values[served].tobytes()
    assert rows.matrix.tobytes() == plain.matrix.tobytes()
    # One µs earlier, the rows stored at T are newer: only the older ones and the unreadable
    # times stay stale.
    assert store.read("v1", DIM, USER, items, newer_than=T - 1).stale == [0, 3, 4, 9]

    # The newest event strictly before a time, looked up by the read itself.
    def newest(before_us: int, key: str = EVENTS_KEY):
        got = store.read("v1", DIM, USER, items, newer_than=NewestEvent(key, before_us))
        assert got.matrix.tobytes() == plain.matrix.tobytes() and got.missing == plain.missing
        return got.newer_than_us, got.stale

    assert newest(T + 100) == (T + 50, [0, 1, 2, 3, 4, 9, 10])
    assert newest(T + 50) == (T, [0, 1, 3, 4, 9])
    assert newest(T) == (T - 5, [3, 4])  # rows at T-1 are newer than the event at T-5
    assert newest(T - 5) == (None, [])  # no event before: nothing compared
    assert newest(T + 100, key="stale:hist:{43}") == (None, [])  # a user without history


def test_the_stale_report_on_a_single_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    project = f"stale_{uuid.uuid4().hex[:8]}"
    store = RedisEmbeddingStore(client, project)
    check_report(store, *plant(client, store, project))


def test_the_stale_report_on_a_cluster_is_the_same(redis_cluster):  # noqa: F811
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", p) for p in redis_cluster], socket_timeout=5
    )
    try:
        store = RedisEmbeddingStore(client, "cluster_stale")
        items, values = plant(client, store, "cluster_stale")
        keys = entity_keys("cluster_stale", {"user_id": np.full(len(items), USER), "item_id": items})
        assert len({client.get_node_from_key(k).port for k in keys}) > 1
        check_report(store, items, values)
    finally:
        client.close()


def test_latest_us_is_the_newest_event_before_a_time(redis_url):
    client = redis.Redis.from_url(redis_url)
    online = OnlineHistories(client, f"stale_{uuid.uuid4().hex[:8]}", ["feed", "search"])
    ts = [T, T + 5, T + 9]
    online.add(pd.DataFrame({
        "user_id": [USER] * 3, "item_id": [1, 2, 3],
        "event_timestamp": pd.to_datetime(ts, unit="us", utc=True), "surface": ["feed"] * 3,
        "action": [0, 1, 0],
    }))  # fmt: skip
    assert online.latest_us(USER) == T + 9
    assert online.latest_us(USER, before_us=T + 9) == T + 5  # strictly before
    assert online.latest_us(USER, before_us=T + 10) == T + 9
    assert online.latest_us(USER, before_us=T) is None
    assert online.latest_us(USER + 1) is None


# --- the lookup ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(demo_repo, redis_url, tmp_path_factory):
    """(ctx, events): a demo copy's context, its online histories seeded from its log."""
    repo = own_repo(demo_repo, tmp_path_factory.mktemp("stale") / "feature_repo")
    ctx = ServiceContext(Settings(repo=repo.path, redis_url=redis_url, refresh_stale=True), redis_url)
    events = pd.read_parquet(repo.events_dir / "events.parquet")
    assert backfill_histories(ctx) == len(events)
    yield ctx, events
    ctx.close()


def own_user(events: pd.DataFrame, k: int) -> int:
    """The k-th user of the log: each test its own, so that one's events miss the others."""
    return int(np.unique(events["user_id"])[k])


def store_rows(ctx: ServiceContext, user: int, items: np.ndarray, ts_us: int, m: np.ndarray) -> None:
    assert ctx.store.write("v1", np.full(len(items), user), items, np.full(len(items), ts_us), m) == len(items)


def stored_time(ctx: ServiceContext, user: int, item: int) -> int:
    key = entity_keys(ctx.repo.project, {"user_id": np.array([user]), "item_id": np.array([item])})[0]
    return decode_timestamp_us(ctx.client.hget(key, ts_field(VIEW)))


def ingest(ctx: ServiceContext, event: pd.DataFrame) -> None:
    """One event through the events stream and the `histories` consumer."""
    stream = ctx.events_stream
    stream.ensure_groups()
    assert stream.append(pa.Table.from_pandas(event, preserve_index=False)).new == 1
    assert HistoriesConsumer(stream, ctx.histories).drain() >= 1


def test_a_row_logged_before_a_new_event_is_computed_again_and_written_back(live):
    ctx, events = live
    version = ctx.version("v1")
    surface = ctx.fm_tier.surfaces(version)[0]
    user = own_user(events, 0)
    items = np.array([2, 7, 11])
    t0 = ctx.histories.latest_us(user) + 60_000_000  # logged after the user's newest event
    logged = ctx.fm_tier.compute(version, user, items, surface, t0).taes
    store_rows(ctx, user, items, t0, logged)

    first = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert first.computed == [] and first.stats.stored == 3 and not first.stats.stale
    assert first.matrix.tobytes() == logged.tobytes()

    event = new_event(events, user, item=7, ts_us=to_us(datetime.now(UTC)) - 1_000_000,
                      surface="search")
    ingest(ctx, event)
    out = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert out.computed == [0, 1, 2] and out.missing == []
    assert out.stats.stale == {"recomputed": 3} and out.stats.stored == 0
    served_at = stored_time(ctx, user, 2)
    assert served_at > int(event["event_timestamp"].iloc[0].value // 1000)
    added = pd.concat([events, event.drop(columns=[EVENT_ID])], ignore_index=True)
    want = log_engine(ctx.repo, version, added).compute_request(user, served_at, surface, items)
    np.testing.assert_allclose(out.matrix, want, rtol=0, atol=1e-5)
    assert np.abs(out.matrix - logged).max() > 1e-4  # the event changed the TAEs

    # The store holds the new rows (compare-and-set: newer than t0), served as stored from now.
    assert ctx.store.read("v1", version.dim, user, items).matrix.tobytes() == out.matrix.tobytes()
    again = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert again.computed == [] and not again.stats.stale
    assert again.matrix.tobytes() == out.matrix.tobytes()


def test_a_row_stored_after_the_newest_event_is_served_as_stored(live):
    ctx, events = live
    user = own_user(events, 1)
    items = np.array([3, 5])
    newest = ctx.histories.latest_us(user)
    mine = np.full((2, ctx.version("v1").dim), 0.25, dtype=np.float32)  # no FM gives these
    store_rows(ctx, user, items[:1], newest + 1, mine[:1])
    store_rows(ctx, user, items[1:], newest, mine[1:])  # at the newest event: it does not see it

    out = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert out.matrix[0].tobytes() == mine[0].tobytes()
    assert out.computed == [1] and out.stats.stale == {"recomputed": 1}
    assert np.abs(out.matrix[1] - 0.25).max() > 1e-3


def test_a_user_without_online_history_is_served_stored_rows_as_before(live):
    ctx, _ = live
    user = 999_999
    assert ctx.histories.latest_us(user) is None
    items = np.array([1, 2])
    mine = np.full((2, ctx.version("v1").dim), -0.5, dtype=np.float32)
    store_rows(ctx, user, items, T - 10**12, mine)  # long ago
    out = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert out.matrix.tobytes() == mine.tobytes()
    assert out.computed == [] and out.stats.stored == 2 and not out.stats.stale


def test_a_stale_row_read_through_cannot_compute_is_served_as_stored(live):
    """An item outside the FM's vocabulary has a stored row from before the newest event: it
    is served as it is (better than nothing), counted stale "served", and not as a skipped
    missing row; the other stale row is computed again."""
    ctx, events = live
    user = own_user(events, 2)
    items = np.array([4, 10**6])  # the tiny FM knows 80 items
    old = ctx.histories.latest_us(user) - 1
    mine = np.full((2, ctx.version("v1").dim), 0.75, dtype=np.float32)
    store_rows(ctx, user, items, old, mine)
    out = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert out.computed == [0] and out.missing == []
    assert out.matrix[1].tobytes() == mine[1].tobytes()
    assert out.stats.stale == {"recomputed": 1, "served": 1}
    assert out.stats.skipped["unknown_item"] == 0
    assert stored_time(ctx, user, int(items[1])) == old  # nothing written for it


def test_over_rest_an_ingested_event_makes_the_next_lookup_recompute(live, redis_url):
    """POST /v1/events, the `histories` consumer, then POST /v1/embeddings/lookup: the rows
    logged before the event come back computed, and /metrics counts them."""
    ctx, events = live
    version = ctx.version("v1")
    surface = ctx.fm_tier.surfaces(version)[0]
    user = own_user(events, 3)
    items = np.array([1, 8, 30, 61])
    t0 = ctx.histories.latest_us(user) + 1_000_000
    store_rows(ctx, user, items, t0, ctx.fm_tier.compute(version, user, items, surface, t0).taes)
    spec = DatasetSpec.load(ctx.repo.events_dir / "spec.json")
    event_us = to_us(datetime.now(UTC)) - 2_000_000

    app = create_app(Settings(repo=ctx.repo.path, redis_url=redis_url, refresh_stale=True), redis_url)
    body = {"user_id": user, "item_ids": items.tolist(), "fm_version": "v1"}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        before = client.post("/v1/embeddings/lookup", json=body)
        assert before.status_code == 200 and before.json()["computed"] == []
        r = client.post("/v1/events", json={"events": [{
            "user_id": user, "item_id": 8, "event_timestamp": event_us,
            "surface": spec.surfaces[-1], "action": 1, "event_id": f"stale-{uuid.uuid4().hex}",
        }]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert HistoriesConsumer(ctx.events_stream, ctx.histories).drain() >= 1
        assert ctx.histories.latest_us(user) == event_us

        after = client.post("/v1/embeddings/lookup", json=body)
        assert after.status_code == 200
        assert after.json()["computed"] == [0, 1, 2, 3]
        served_at = stored_time(ctx, user, 1)
        got = np.array(after.json()["embeddings"], dtype=np.float32)
        assert got.tobytes() == ctx.store.read("v1", version.dim, user, items).matrix.tobytes()
        assert served_at > event_us
        metrics = client.get("/metrics").text
    assert 'foundex_stale_rows_total{outcome="recomputed"} 4.0' in metrics
