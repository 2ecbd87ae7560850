"""The FM serving tier over online histories (Redis), not the event log: seeding, equivalence
with the log's TAEs, the history cache and its invalidation by new events, event-to-TAE
visibility through the stream.

Every test runs on a copy of the tiny demo repo under a Feast project of its own (its own
Redis keys: online histories, streams, written-back TAEs), so the shared demo stays as it is.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from api.services.context import ServiceContext
from api.services.histories import backfill_histories
from api.services.lookup import lookup
from api.settings import Settings
from fm import TAEEngine, UserHistories
from fm.inference import history_fingerprints
from fm.timefeatures import timestamps_us, to_us
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec
from store_bridge.feast_layout import decode_timestamp_us, entity_keys, ts_field
from store_bridge.fm_tier import FMTier, load_engine
from store_bridge.repo import FeatureRepo, view_name
from store_bridge.streams.histories import HistoriesConsumer, OnlineHistories
from store_bridge.streams.records import EVENT_ID

VERSIONS = ("v1", "v2")


def own_repo(demo_repo, dest) -> FeatureRepo:
    """A copy of the demo repo under a project of its own (fresh Redis keys)."""
    repo, _ = demo_repo
    shutil.copytree(repo.path, dest)
    cfg_path = dest / "feature_store.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["project"] = f"olh_{uuid.uuid4().hex[:10]}"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return FeatureRepo(dest)


@pytest.fixture(scope="module")
def live(demo_repo, redis_url, tmp_path_factory):
    """(ctx, events): a demo copy's context, its online histories seeded from its log."""
    repo = own_repo(demo_repo, tmp_path_factory.mktemp("olh") / "feature_repo")
    ctx = ServiceContext(Settings(repo=repo.path, redis_url=redis_url, refresh_stale=True), redis_url)
    events = pd.read_parquet(repo.events_dir / "events.parquet")
    assert backfill_histories(ctx) == len(events)  # every user's history is within the cap
    yield ctx, events
    ctx.close()


def log_engine(repo: FeatureRepo, version, events: pd.DataFrame) -> TAEEngine:
    """The event-log path: the version's engine over UserHistories built from a log."""
    spec = DatasetSpec.load(repo.events_dir / "spec.json")
    return load_engine(repo, version, UserHistories.from_events(events, spec.surfaces))


def new_event(events: pd.DataFrame, user: int, item: int, ts_us: int, surface: str) -> pd.DataFrame:
    """One more event of `user` in the log's own schema, with an id of its own."""
    row = events[events["user_id"] == user].iloc[[-1]].copy()
    row["item_id"], row["surface"], row["action"] = item, surface, 1
    row[EVENT_TIMESTAMP] = pd.to_datetime([ts_us], unit="us", utc=True).astype("datetime64[us, UTC]")
    row[EVENT_ID] = f"test-{uuid.uuid4().hex}"
    return row.reset_index(drop=True)


# --- seeding -------------------------------------------------------------------------------


def test_backfill_holds_each_users_events(demo_repo, redis_url, tmp_path):
    """Every user's events, exactly once, and nothing added on a second run; unknown users
    are unknown."""
    repo = own_repo(demo_repo, tmp_path / "feature_repo")
    ctx = ServiceContext(Settings(repo=repo.path, redis_url=redis_url, refresh_stale=True), redis_url)
    events = pd.read_parquet(repo.events_dir / "events.parquet")
    assert backfill_histories(ctx) == len(events)
    assert backfill_histories(ctx) == 0
    spec = DatasetSpec.load(repo.events_dir / "spec.json")
    codes = {s: i for i, s in enumerate(spec.surfaces)}
    for user in events["user_id"].unique()[:10]:
        mine = events[events["user_id"] == user]
        want = sorted(zip(timestamps_us(mine[EVENT_TIMESTAMP]).tolist(), mine["item_id"].tolist(),
                          mine["action"].tolist(), mine["surface"].map(codes).tolist(),
                          strict=True))
        h = ctx.histories.read(int(user))
        got = sorted(zip(h.ts_us.tolist(), h.item.tolist(), h.action.tolist(),
                         h.surface.tolist(), strict=True))
        assert got == want and h.version == len(mine)
        assert ctx.fm_tier.knows_user(int(user))
    assert not ctx.fm_tier.knows_user(999_999)
    ctx.close()


# --- the same TAEs as the event log's ----------------------------------------------------


@pytest.mark.parametrize("version_name", VERSIONS)
def test_served_taes_equal_the_event_log_path(live, version_name):
    """For every user (whole history within the cap), at a request time after the log and at
    one inside it (the history cut there), the tier's TAEs from Redis equal the engine's over
    the parquet log. The demo's log holds same-instant events (one request's impressions):
    both sources must order them alike."""
    ctx, events = live
    version = ctx.version(version_name)
    want_engine = log_engine(ctx.repo, version, events)
    surfaces = ctx.fm_tier.surfaces(version)
    ts = timestamps_us(events[EVENT_TIMESTAMP])
    inside = int(np.quantile(ts, 0.7))
    items = np.arange(0, 80, 7)
    compared = 0
    for i, user in enumerate(np.unique(events["user_id"])):
        surface = surfaces[i % len(surfaces)]
        for t in (int(ts.max()) + 3_600_000_000, inside):
            got = ctx.fm_tier.compute(version, int(user), items, surface, t)
            assert not got.unknown_user and got.positions.tolist() == list(range(len(items)))
            want = want_engine.compute_request(int(user), t, surface, items)
            np.testing.assert_allclose(got.taes, want, rtol=0, atol=1e-5)
            compared += 1
    assert compared == 2 * events["user_id"].nunique()


def test_a_cache_hit_gives_the_same_taes_as_recomputing(live):
    ctx, events = live
    version = ctx.version("v1")
    tier = FMTier(ctx.repo, ctx.histories)  # a cold cache of its own
    user = int(events["user_id"].iloc[0])
    items = np.array([3, 1, 4, 15, 9, 26])
    t = int(timestamps_us(events[EVENT_TIMESTAMP]).max()) + 60_000_000
    plain = log_engine(ctx.repo, version, events)  # no cache at all
    first = tier.compute(version, user, items, "feed", t)
    stats = tier.cache_stats(version)
    assert (stats.hits, stats.misses) == (0, 1)
    for later, surface, cands in [(t, "feed", items), (t + 5_000_000, "search", items[::-1])]:
        again = tier.compute(version, user, cands, surface, later)
        np.testing.assert_array_equal(
            again.taes, plain.compute_request(user, later, surface, cands).astype(np.float32)
        )
    assert (stats.hits, stats.misses) == (2, 1)
    np.testing.assert_array_equal(first.taes, plain.compute_request(user, t, "feed", items))


# --- a new event is visible --------------------------------------------------------------


def test_an_ingested_event_reaches_the_next_read_through(live):
    """An event appended to the events stream and handled by the `histories` consumer: the
    next computation for its user reflects it (the cached history is dropped), and a lookup's
    read-through computes and writes back the TAE of the log with the event added."""
    ctx, events = live
    version = ctx.version("v1")
    user = int(events["user_id"].iloc[-1])
    items = np.array([2, 7, 11, 40])
    surface = ctx.fm_tier.surfaces(version)[0]
    now = to_us(datetime.now(UTC))
    event = new_event(events, user, item=int(items[1]), ts_us=now - 1_000_000, surface="search")
    before = ctx.fm_tier.compute(version, user, items, surface, now)
    stats = ctx.fm_tier.cache_stats(version)
    invalidated = stats.invalidations

    stream = ctx.events_stream
    stream.ensure_groups()
    assert stream.append(pa.Table.from_pandas(event, preserve_index=False)).new == 1
    assert HistoriesConsumer(stream, ctx.histories).drain() == 1

    after = ctx.fm_tier.compute(version, user, items, surface, now)
    assert stats.invalidations == invalidated + 1
    assert np.abs(after.taes - before.taes).max() > 1e-4
    added = pd.concat([events, event.drop(columns=[EVENT_ID])], ignore_index=True)
    with_event = log_engine(ctx.repo, version, added)
    np.testing.assert_allclose(
        after.taes, with_event.compute_request(user, now, surface, items), rtol=0, atol=1e-5
    )

    # Through the lookup use-case: nothing stored for these pairs in this project, so
    # read-through computes them as of the request and writes them back.
    out = lookup(ctx, user, items.tolist(), fm_version="v1")
    assert out.computed == list(range(len(items))) and out.missing == []
    key = entity_keys(ctx.repo.project, {"user_id": np.array([user]), "item_id": items[:1]})[0]
    served_at = decode_timestamp_us(ctx.client.hget(key, ts_field(view_name("v1"))))
    assert served_at > now
    np.testing.assert_allclose(
        out.matrix, with_event.compute_request(user, served_at, surface, items), rtol=0, atol=1e-5
    )


def test_a_late_event_invalidates_a_capped_history_the_fingerprint_misses(live, tmp_path):
    """A user at the cap gets a late event (older than their newest): the oldest stored one
    is dropped, so the count, kept length and last time as of the request are all unchanged;
    only the history's version says it changed. The cache must not serve the old K/V."""
    ctx, events = live
    version = ctx.version("v1")
    spec = DatasetSpec.load(ctx.repo.events_dir / "spec.json")
    cap = 24  # >= the tiny FMs' max_history (16), below every demo user's event count
    online = OnlineHistories(ctx.client, f"olhcap_{uuid.uuid4().hex[:8]}", spec.surfaces, cap=cap)
    user = int(events["user_id"].iloc[0])
    mine = events[events["user_id"] == user]
    assert len(mine) > cap
    online.backfill(mine)
    tier = FMTier(ctx.repo, online)
    ts = np.sort(timestamps_us(mine[EVENT_TIMESTAMP]))
    t = int(ts[-1]) + 60_000_000
    items = np.array([5, 6, 7])
    before = tier.compute(version, user, items, "feed", t)
    old_h, old_v = online.user_histories(user)

    # Between two requests among the last few (a request's events share one instant).
    i = len(ts) - 10 + int(np.argmax(np.diff(ts[-10:])))
    late = new_event(events, user, item=33, ts_us=int(ts[i] + (ts[i + 1] - ts[i]) // 2),
                     surface="feed")
    assert online.add(late) == 1
    new_h, new_v = online.user_histories(user)
    fp = [history_fingerprints(h, np.array([user]), np.array([t]), 16) for h in (old_h, new_h)]
    assert np.array_equal(fp[0], fp[1]) and new_v != old_v  # only the version tells

    stats = tier.cache_stats(version)
    invalidated = stats.invalidations
    after = tier.compute(version, user, items, "feed", t)
    assert stats.invalidations == invalidated + 1
    assert np.abs(after.taes - before.taes).max() > 1e-4
    added = pd.concat([events, late.drop(columns=[EVENT_ID])], ignore_index=True)
    np.testing.assert_allclose(
        after.taes, log_engine(ctx.repo, version, added).compute_request(user, t, "feed", items),
        rtol=0, atol=1e-5,
    )


# --- limits and laziness -----------------------------------------------------------------


def test_a_cap_below_an_fms_max_history_is_warned_once(live, caplog):
    ctx, events = live
    spec = DatasetSpec.load(ctx.repo.events_dir / "spec.json")
    online = OnlineHistories(ctx.client, f"olhsmall_{uuid.uuid4().hex[:8]}", spec.surfaces, cap=8)
    online.backfill(events)
    tier = FMTier(ctx.repo, online)
    version = ctx.version("v2")
    user = int(events["user_id"].iloc[0])
    with caplog.at_level(logging.WARNING, logger="foundex.api.fm"):
        for _ in range(3):
            now = to_us(datetime.now(UTC))
            assert tier.compute(version, user, np.array([1, 2]), "feed", now) is not None
    warned = [r for r in caplog.records if "history_cap" in r.getMessage()]
    assert len(warned) == 1 and "v2" in warned[0].getMessage()
    assert len(online.read(user)) == 8


def test_without_a_dataset_spec_read_through_is_off_and_redis_untouched(demo_repo, tmp_path, caplog):
    repo = own_repo(demo_repo, tmp_path / "feature_repo")
    (repo.events_dir / "spec.json").unlink()
    dead = "redis://127.0.0.1:1/0"  # nothing listens: any connection attempt would fail loudly
    ctx = ServiceContext(Settings(repo=repo.path, redis_url=dead), dead)
    with caplog.at_level(logging.WARNING, logger="foundex.api.fm"):
        assert ctx.fm_tier.surfaces(ctx.version("v1")) is None
        assert ctx.fm_tier.compute(ctx.version("v1"), 1, np.array([1]), "feed", 10**15) is None
    assert any("read-through off" in r.getMessage() for r in caplog.records)
    assert "client" not in ctx.__dict__ and "histories" not in ctx.__dict__


# --- visibility, measured -----------------------------------------------------------------


def test_measure_visibility_returns_one_latency_per_probe(live):
    """The serving side on the service's context, the consumer on one of its own with a
    consumer's timeout (as `foundex consume` builds it)."""
    from store_bridge.streams.visibility import measure_visibility

    ctx, events = live
    spec = DatasetSpec.load(ctx.repo.events_dir / "spec.json")
    users = [int(u) for u in np.unique(events["user_id"])[:3]]
    worker_ctx = ServiceContext(ctx.settings, ctx.redis_url, redis_timeout_s=10)
    consumer = HistoriesConsumer(worker_ctx.events_stream, worker_ctx.histories,
                                 consumer="visibility")
    got = measure_visibility(
        ctx.events_stream, consumer, ctx.fm_tier, ctx.version("v1"), spec, users,
        np.array([4, 8, 15]), "feed", samples=4,
    )  # fmt: skip
    worker_ctx.close()
    assert len(got.latencies_s) == 4 and all(0 < x < 10 for x in got.latencies_s)
    assert got.consumer_reconnects == 0
    assert got.p50 <= got.p99
    assert not any(t.name == "visibility-histories" for t in threading.enumerate())
    for u in users:  # the probes are real events of these users now
        assert len(ctx.histories.read(u)) > (events["user_id"] == u).sum()
