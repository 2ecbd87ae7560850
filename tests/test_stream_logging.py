"""The logging tier as a stream, on a real Redis: served impressions -> TAEs of every active FM
version as of the request time (offline parquet and online Redis), and the dynamic join of
impressions with their later feedback into expert training rows, against a point-in-time
oracle; re-delivered batches write nothing twice; the lookup enqueues what it serves and keeps
answering when the stream is full."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm.history import UserHistories
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, timestamps_us
from store_bridge.fm_tier import load_engine
from store_bridge.online import RedisEmbeddingStore
from store_bridge.redis_server import redis_client
from store_bridge.streams.histories import HistoriesConsumer, OnlineHistories
from store_bridge.streams.impression_buffer import IMPRESSION_ACTION, impression_batch
from store_bridge.streams.impressions import (
    FeedbackJoinConsumer,
    ImpressionLogConsumer,
    OpenImpressions,
    StreamGate,
    read_training_rows,
)
from store_bridge.streams.records import content_ids, decode_batch
from store_bridge.streams.stream import RedisStream

S = 1_000_000  # µs per second
WINDOW_S = 60  # the join window, in event time


class KilledBeforeAck(RuntimeError):
    pass


class CrashingLog(ImpressionLogConsumer):
    """Handles its batch completely, then dies before the acknowledgement."""

    def handle(self, entries):
        super().handle(entries)
        raise KilledBeforeAck


class CrashingJoin(FeedbackJoinConsumer):
    def handle(self, entries):
        super().handle(entries)
        raise KilledBeforeAck


def events_table(rows: list[tuple], spec: DatasetSpec) -> pa.Table:
    """rows: (user, item, ts_us, surface, labels) -> canonical events with derived ids. Tasks
    outside the row's surface are NaN, the others 0 unless `labels` names them."""
    user = np.array([r[0] for r in rows], dtype=np.int64)
    item = np.array([r[1] for r in rows], dtype=np.int64)
    ts = np.array([r[2] for r in rows], dtype=np.int64)
    surface = np.array([r[3] for r in rows], dtype=object)
    action = np.array([1 if r[4] else 0 for r in rows], dtype=np.int16)
    df = pd.DataFrame({
        "request_id": np.arange(len(rows), dtype=np.int64), "user_id": user, "item_id": item,
        EVENT_TIMESTAMP: pd.to_datetime(ts, unit="us", utc=True).astype("datetime64[us, UTC]"),
        "surface": surface, "hour": np.zeros(len(rows), np.int8), "action": action,
    })
    for t in spec.all_tasks:
        df[t] = np.array([
            (r[4].get(t, 0.0) if t in spec.surface_tasks[r[3]] else np.nan) for r in rows
        ], dtype=np.float32)
    df["event_id"] = content_ids(user, item, ts, surface, action)
    return pa.Table.from_pandas(df, preserve_index=False)


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_url):
    """A repo with two active FM versions, its event log backfilled into online histories, and
    the live part: impressions at four request times with events between them, appended in
    time order to the two streams (the join's group created first, at "$")."""
    from test_store_logging import make_fm_repo

    project = f"sl_{uuid.uuid4().hex[:8]}"
    repo, base = make_fm_repo(tmp_path_factory.mktemp("stream_logging") / "repo", project)
    spec = DatasetSpec.load(repo.events_dir / "spec.json")
    client = redis_client(redis_url, timeout=10)
    histories = OnlineHistories(client, project, spec.surfaces, cap=256)
    histories.backfill(base)
    events = RedisStream(client, project, "events", groups=("histories",))
    events.ensure_groups()
    impressions = RedisStream(client, project, "impressions", dedup_s=0, groups=("logging",))
    impressions.ensure_groups()
    opens = OpenImpressions(client, project, window_s=WINDOW_S)
    store = RedisEmbeddingStore(client, project)

    def join(cls=FeedbackJoinConsumer, **kw):
        return cls(events, repo, opens, spec, gate=StreamGate(impressions, "logging"),
                   gate_wait_s=0.05, **kw)

    first = join()
    assert first.poll(block=False) == 0  # creates the "join" group at the end of the stream

    users = [int(u) for u in base["user_id"].unique()[:4]]
    u0, u1, u2, u3 = users
    T = (timestamps_us(base[EVENT_TIMESTAMP]).max() // S + 86_400) * S
    # (what, payload) in time order; impressions: (user, items, request time, surface)
    click = {"click": 1.0, "long_view": 0.5}
    timeline = [
        ("imp", (u0, [1, 2, 3], T, "feed")),
        ("imp", (u1, [4, 5], T, "search")),
        ("ev", [(u0, 1, T + 10 * S, "feed", click),  # feedback: u0-1 @T
                (u0, 40, T + 12 * S, "feed", {}),  # an ordinary event: u0's history grows
                (u1, 4, T + 20 * S, "search", {"click": 1.0, "purchase": 1.0}),  # u1-4 @T
                (u1, 5, T + 25 * S, "feed", click)]),  # other surface: not u1-5's feedback
        ("imp", (u0, [2, 6], T + 30 * S, "feed")),  # u0-2 again, with a longer history
        ("ev", [(u0, 2, T + 40 * S, "feed", click),  # closes the latest open u0-2: @T+30
                (u2, 7, T + 50 * S, "notif", {"follow": 1.0})]),  # before u2-7's request
        ("imp", (u2, [7, 8], T + 100 * S, "notif")),
        ("ev", [(u2, 7, T + 150 * S, "notif", {"click": 1.0, "hide": 1.0})]),  # u2-7 @T+100
        ("ev", [(u3, 9, T + 200 * S, "search", {})]),  # moves the watermark past T+160
        ("imp", (u3, [10], T + 250 * S, "search")),  # its window is still open at the end
    ]
    live_events = []
    for what, payload in timeline:
        if what == "imp":
            u, items, r, s = payload
            impressions.append(impression_batch(u, np.array(items), r, s, fm_version="v1"))
        else:
            table = events_table(payload, spec)
            events.append(table)
            live_events.append(table)
    HistoriesConsumer(events, histories).drain()
    versions = repo.load_manifest().active()
    engines = {v.version: load_engine(repo, v, UserHistories.from_events(base, spec.surfaces))
               for v in versions}
    yield {
        "repo": repo, "spec": spec, "client": client, "histories": histories, "events": events,
        "impressions": impressions, "opens": opens, "store": store, "join": join,
        "first_join": first, "users": users, "T": T, "engines": engines,
        "live_events": pa.concat_tables(live_events).to_pandas(), "redis_url": redis_url,
    }
    client.close()


def oracle(live, version: str, user: int, item: int, r: int, surface: str) -> np.ndarray:
    """The TAE from the user's history cut by hand at the request time (strictly before it)."""
    h = live["histories"].read(user)
    keep = h.ts_us < r
    one = UserHistories(
        users=np.array([user]), offsets=np.array([0, int(keep.sum())]), ts_us=h.ts_us[keep],
        item=h.item[keep], action=h.action[keep], surface=h.surface[keep],
        surfaces=live["spec"].surfaces,
    )  # fmt: skip
    engine = live["engines"][version]
    engine.set_histories(one)
    return engine.compute(np.array([user]), np.array([item]), np.array([r]),
                          np.array([surface], dtype=object))[0]


def expected_impressions(live) -> list[tuple[int, int, int, str]]:
    u0, u1, u2, u3 = live["users"]
    T = live["T"]
    return [(u0, i, T, "feed") for i in (1, 2, 3)] + [(u1, i, T, "search") for i in (4, 5)] + [
        (u0, i, T + 30 * S, "feed") for i in (2, 6)] + [(u2, i, T + 100 * S, "notif") for i in (7, 8)
    ] + [(u3, 10, T + 250 * S, "search")]


def test_logged_taes_equal_the_point_in_time_oracle_and_a_redelivered_batch_adds_nothing(live):
    repo, store = live["repo"], live["store"]
    # The join waits for the logging consumer: feedback is never looked for before the
    # impressions appended ahead of it are open.
    join = live["first_join"]
    assert join.poll(block=False) == 0 and join.gated == 1 and join.join_stats.joined == 0
    assert read_training_rows(repo).empty

    # Killed after writing its first batch, before acknowledging it; a new process resumes.
    crashing = CrashingLog(live["impressions"], repo, store, live["histories"],
                           opens=live["opens"], count=1)
    with pytest.raises(KilledBeforeAck):
        crashing.drain()
    logger = ImpressionLogConsumer(live["impressions"], repo, store, live["histories"],
                                   opens=live["opens"], count=1,
                                   gate=StreamGate(live["events"], "histories"))
    logger.drain()
    assert logger.stats.entries == 5  # the crashed batch again, then the four others

    imps = expected_impressions(live)
    for v in ("v1", "v2"):
        files = sorted(repo.tae_dir(v).glob("*/*.parquet"))
        assert files and not list(repo.tae_dir(v).rglob("*.tmp"))
        off = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        off["ts_us"] = timestamps_us(off[EVENT_TIMESTAMP])
        keys = ["user_id", "item_id", "ts_us"]
        assert not off.duplicated(keys).any(), f"{v}: a re-delivered batch duplicated rows"
        assert sorted(map(tuple, off[keys].to_numpy().tolist())) == sorted(
            (u, i, r) for u, i, r, _ in imps)
        for u, i, r, s in imps:
            got = off[(off.user_id == u) & (off.item_id == i) & (off.ts_us == r)]["embedding"]
            np.testing.assert_allclose(np.asarray(got.iloc[0], np.float32),
                                       oracle(live, v, u, i, r, s), rtol=0, atol=1e-5)
        # Online: the latest request's TAE of each (user, item).
        latest = off.sort_values("ts_us").drop_duplicates(["user_id", "item_id"], keep="last")
        for row in latest.itertuples():
            s = next(s for u, i, r, s in imps if (u, i, r) == (row.user_id, row.item_id, row.ts_us))
            read = store.read(v, len(row.embedding), row.user_id, np.array([row.item_id]))
            assert read.missing == []
            np.testing.assert_allclose(read.matrix[0], oracle(live, v, row.user_id, row.item_id,
                                                              row.ts_us, s), rtol=0, atol=1e-5)
    # Never a later history: u0's TAEs at T differ from those with the events after T.
    u0, T = live["users"][0], live["T"]
    at_t, later = oracle(live, "v1", u0, 3, T, "feed"), oracle(live, "v1", u0, 3, T + 35 * S, "feed")
    assert np.abs(at_t - later).max() > 1e-4, "the test cannot tell a later history apart"
    assert logger.log_stats.impressions == len(imps) and logger.log_stats.refused == 0


def test_join_rows_carry_request_time_taes_and_feedback_labels(live):
    repo, spec = live["repo"], live["spec"]
    u0, u1, u2, u3 = live["users"]
    T = live["T"]
    # Killed after its first batch's rows were written and closed, before the ack.
    with pytest.raises(KilledBeforeAck):
        live["join"](CrashingJoin, count=2).drain()
    join = live["join"](count=2)
    join.drain()
    rows = read_training_rows(repo)
    rows["ts_us"] = timestamps_us(rows[EVENT_TIMESTAMP])
    assert not rows.duplicated("impression_id").any(), "a re-delivered batch duplicated rows"
    got = {(r.user_id, r.item_id, r.ts_us): r for r in rows.itertuples()}
    feedback = {(u0, 1, T): T + 10 * S, (u1, 4, T): T + 20 * S, (u0, 2, T + 30 * S): T + 40 * S,
                (u2, 7, T + 100 * S): T + 150 * S}
    swept = {(u0, 2, T), (u0, 3, T), (u1, 5, T), (u0, 6, T + 30 * S), (u2, 8, T + 100 * S)}
    assert set(got) == set(feedback) | swept  # u3's window has not passed: no row yet
    ev = live["live_events"]
    ev["ts_us"] = timestamps_us(ev[EVENT_TIMESTAMP])
    for (u, i, r), fb in feedback.items():
        row = got[(u, i, r)]
        src = ev[(ev.user_id == u) & (ev.item_id == i) & (ev.ts_us == fb)].iloc[0]
        assert row.has_feedback and row.feedback_event_id == src.event_id
        assert timestamps_us(pd.Series([row.feedback_timestamp]))[0] == fb
        for t in spec.all_tasks:
            np.testing.assert_equal(getattr(row, t), src[t])
        assert row.data_to_trainer_us >= 0
    for u, i, r in swept:
        row = got[(u, i, r)]
        assert not row.has_feedback and row.feedback_event_id is None
        assert pd.isna(row.data_to_trainer_us)
        for t in spec.all_tasks:
            want = 0.0 if t in spec.surface_tasks[row.surface] else np.nan
            np.testing.assert_equal(getattr(row, t), want)
    # Each row's TAEs are the ones as of its request time.
    for (u, i, r), row in got.items():
        for v in ("v1", "v2"):
            np.testing.assert_allclose(np.asarray(getattr(row, f"tae_{v}"), np.float32),
                                       oracle(live, v, u, i, r, row.surface), rtol=0, atol=1e-5)
    assert rows.impression_id.tolist() == [
        content_ids(np.array([u]), np.array([i]), np.array([r]), np.array([s], object),
                    np.array([IMPRESSION_ACTION]))[0]
        for u, i, r, s in zip(rows.user_id, rows.item_id, rows.ts_us, rows.surface, strict=True)
    ]
    assert live["opens"].open_count() == 1  # u3's impression waits for its window
    # Its window passes in event time: the sweep emits it with labels 0.
    live["events"].append(events_table([(u3, 11, T + 400 * S, "search", {})], live["spec"]))
    HistoriesConsumer(live["events"], live["histories"]).drain()
    join.drain()
    late = read_training_rows(repo)
    late["ts_us"] = timestamps_us(late[EVENT_TIMESTAMP])
    row = late[(late.user_id == u3) & (late.ts_us == T + 250 * S)]
    assert len(row) == 1 and not row.has_feedback.iloc[0] and row.click.iloc[0] == 0.0
    assert live["opens"].open_count() == 0 and not late.duplicated("impression_id").any()


def test_lookup_enqueues_its_impressions_and_answers_when_the_stream_is_full(live, monkeypatch):
    from api.services.context import ServiceContext
    from api.services.lookup import lookup
    from api.settings import Settings

    repo, u0 = live["repo"], live["users"][0]
    url = live["redis_url"]
    settings = dict(repo=repo.path, redis_url=url, read_through=False)
    ctx = ServiceContext(Settings(**settings, impression_flush_ms=60_000), url)
    stream = ctx.impressions_stream
    before = stream.length()
    out = lookup(ctx, u0, [3, 1, 3], fm_version="v2")  # no surface named: the FM's first
    assert out.stats.impressions_not_logged == 0 and stream.length() == before
    assert ctx.impression_buffer.pending_rows == 2  # buffered, not appended yet
    assert ctx.impression_buffer.flush() and stream.length() == before + 1
    entry_id, fields = ctx.client.xrevrange(stream.key, count=1)[0]
    batch = decode_batch(fields[b"b"]).to_pandas()
    # One row per served item: the repeated candidate is one impression (one event id).
    assert batch.item_id.tolist() == [3, 1] and (batch.user_id == u0).all()
    assert (batch.surface == "feed").all() and (batch.fm_version == "v2").all()
    request_ms = timestamps_us(batch[EVENT_TIMESTAMP])[0] // 1000
    assert request_ms <= int(entry_id.split(b"-")[0])  # taken before the append

    # The roles `foundex consume logging|join` run, built from the context.
    from api.services.impression_log import build_join_consumer, build_logging_consumer

    lc, jc = build_logging_consumer(ctx), build_join_consumer(ctx, "join-2")
    assert (lc.group, lc.stream.name, lc.gate.stream.name, lc.gate.group) == (
        "logging", "impressions", "events", "histories")
    assert (jc.group, jc.consumer, jc.group_start, jc.stream.name, jc.gate.group) == (
        "join", "join-2", "$", "events", "logging")
    assert jc.opens.window_us == ctx.settings.join_window_s * S
    ctx.close()

    # A full stream: the lookup still answers; the buffer keeps what the stream refuses (to
    # retry it) and counts what it cannot hold.
    full = ServiceContext(Settings(**settings, stream_max_entries=1, impression_buffer_rows=3,
                                   impression_flush_ms=60_000), url)  # fmt: skip
    lookup(full, u0, [5], fm_version="v1")  # the logging group never reads: the stream is full
    assert not full.impression_buffer.flush() and full.impression_buffer.pending_rows == 1
    out = lookup(full, u0, [1, 2], fm_version="v1")
    assert out.version.version == "v1" and out.stats.impressions_not_logged == 0
    assert lookup(full, u0, [4], fm_version="v1").stats.impressions_not_logged == 1
    assert full.impression_buffer.pending_rows == 3 and full.impression_buffer.stats.refused == 1
    full.impression_buffer.close(timeout_s=0.2)
    off = ServiceContext(Settings(**settings, log_served_impressions=False), url)
    n = off.impressions_stream.length()
    assert lookup(off, u0, [1], fm_version="v1").stats.impressions_not_logged == 0
    assert off.impressions_stream.length() == n and "impression_buffer" not in off.__dict__
    full.close()
    off.close()
