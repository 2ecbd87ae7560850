"""One time convention: every hour of day the FM reads is `fm.timefeatures.hour_of_day` of the
event's own UTC microseconds in the FM config's time zone, for training batches, logging and
serving (read-through) alike; edges: before 1970, far future, microsecond ties."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from fm import FMConfig, TAEEngine, UserHistories, checkpoint_digest, save_checkpoint
from fm.batching import Requests, collate
from fm.history import timestamps_us as fm_timestamps_us
from fm.testing import toy_config_kwargs, toy_events
from fm.timefeatures import US_PER_DAY, US_PER_HOUR, check_time_zone, hour_of_day, to_us
from fm.train import train_streaming
from store_bridge.events.files import write_dataset
from store_bridge.events.kuairand import load_kuairand
from store_bridge.events.schema import DatasetSpec, as_microseconds, timestamps_us
from store_bridge.events.synthetic import SyntheticConfig, generate
from tests.test_loaders import BASIC_HEADER, LOG_HEADER  # KuaiRand's CSV headers

INT64 = np.iinfo(np.int64)


# ---- hour_of_day and friends ----------------------------------------------------------------


def test_hour_of_day_floors_before_1970_and_at_hour_edges():
    ts = np.array([-1, 0, US_PER_HOUR - 1, US_PER_HOUR, -US_PER_HOUR, -US_PER_HOUR - 1,
                   -US_PER_DAY, 23 * US_PER_HOUR])
    assert hour_of_day(ts).tolist() == [23, 0, 0, 1, 23, 22, 0, 23]
    assert hour_of_day(ts, "+08:00").tolist() == [7, 8, 8, 9, 7, 6, 8, 7]
    assert hour_of_day(ts, "UTC-05:30").tolist() == [18, 18, 19, 19, 17, 17, 18, 17]
    assert hour_of_day(np.int64(-1)).ndim == 0 and int(hour_of_day(-1)) == 23  # scalars too


@pytest.mark.parametrize("tz,minutes", [("UTC", 0), ("+08:00", 480), ("-0930", -570),
                                        ("GMT+14", 840), ("utc-12:00", -720)])
def test_fixed_offsets_match_exact_integer_arithmetic_over_all_of_int64(tz, minutes):
    rng = np.random.default_rng(0)
    ts = np.concatenate([rng.integers(INT64.min, INT64.max, 2000, dtype=np.int64),
                         [INT64.min, INT64.min + 1, INT64.max, -1, 0, 1]])
    off = minutes * 60 * 1_000_000
    want = [((int(t) + off) // US_PER_HOUR) % 24 for t in ts]  # Python ints: no overflow
    assert hour_of_day(ts, tz).tolist() == want


def test_iana_zones_follow_the_tz_database_including_dst_and_far_instants():
    rng = np.random.default_rng(1)
    lo, hi = to_us(datetime(1901, 1, 1)), to_us(datetime(2200, 1, 1))
    ts = rng.integers(lo, hi, 500, dtype=np.int64)
    for name in ("Asia/Shanghai", "America/New_York", "Australia/Lord_Howe"):
        zone = ZoneInfo(name)
        want = [(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(t)))
                .astimezone(zone).hour for t in ts]
        assert hour_of_day(ts, name).tolist() == want, name
    # New York's spring-forward: 06:59:59.999999 UTC is 01:59 EST, 07:00 UTC is 03:00 EDT
    jump = to_us(datetime(2024, 3, 10, 7, tzinfo=UTC))
    assert hour_of_day(np.array([jump - 1, jump]), "America/New_York").tolist() == [1, 3]
    # Shanghai has had no DST since 1991: the IANA name and +08:00 agree on KuaiRand's weeks
    weeks = np.arange(to_us(datetime(2022, 4, 8)), to_us(datetime(2022, 5, 9)), 977 * 10**6)
    assert (hour_of_day(weeks, "Asia/Shanghai") == hour_of_day(weeks, "+08:00")).all()
    # far outside years 1..9999 the rules of the nearest end apply; never an error
    far = np.array([2**62, INT64.max])
    assert hour_of_day(far, "Asia/Shanghai").tolist() == hour_of_day(far, "+08:00").tolist()
    lmt = (8 * 3600 + 5 * 60 + 43) * 10**6  # Shanghai's local mean time before 1901
    early = np.array([INT64.min, -(2**62)])
    assert hour_of_day(early, "Asia/Shanghai").tolist() == [
        ((int(t) + lmt) // US_PER_HOUR) % 24 for t in early
    ]


def test_bad_time_zones_and_timestamps_are_refused_by_name():
    for bad in ("Mars/Olympus", "+24:00", "+08:61", "", "../../etc/passwd"):
        with pytest.raises(ValueError, match="time zone"):
            check_time_zone(bad)
    with pytest.raises(ValueError, match="Mars/Olympus"):
        FMConfig.small(**toy_config_kwargs(10), time_zone="Mars/Olympus")
    with pytest.raises(ValueError, match="time zone"):
        DatasetSpec(name="x", surfaces=["a"], main_tasks=[], surface_tasks={"a": []},
                    time_zone="Nowhere/Town")
    with pytest.raises(TypeError, match="integer microseconds"):
        hour_of_day(np.array([1.5e15]))


def test_microsecond_conversions_floor_and_cover_far_dates():
    assert to_us(datetime(1969, 12, 31, 23, 59, 59, 999999)) == -1  # naive = UTC
    assert to_us(pd.Timestamp("1969-12-31 23:59:59.9999995", tz="UTC")) == -1  # floor, not 0
    assert to_us(datetime(2022, 4, 26, 0, 30, tzinfo=ZoneInfo("Asia/Shanghai"))) == to_us(
        datetime(2022, 4, 25, 16, 30, tzinfo=UTC))
    ns = pd.Series(pd.to_datetime([-1500, 1500], unit="ns", utc=True))
    assert fm_timestamps_us(ns).tolist() == [-2, 1] and timestamps_us(ns).tolist() == [-2, 1]
    far = np.array(["2500-01-01T00:00:00.000001", "1000-06-01"], dtype="datetime64[us]")
    want = far.view(np.int64).tolist()
    for col in (pd.Series(far), pd.Series(far).dt.tz_localize("UTC"),
                pd.Series([datetime(2500, 1, 1, 0, 0, 0, 1), datetime(1000, 6, 1)], dtype=object)):
        assert fm_timestamps_us(col).tolist() == want
        assert timestamps_us(col).tolist() == want
        assert str(as_microseconds(col).dtype) == "datetime64[us, UTC]"


# ---- collate: the FM's hours come from the timestamps -------------------------------------------


def test_collate_derives_every_hour_from_the_timestamps_in_the_config_zone():
    ev = toy_events(n_users=3, n_items=20, n_requests=30, n_candidates=2, seed=4)
    # move the log to straddle 1970: negative microseconds, hours that floor
    ts = fm_timestamps_us(ev["event_timestamp"])
    ts = ts - ts.min() - 5 * US_PER_HOUR - 1
    ev = ev.assign(event_timestamp=pd.Series(ts.astype("datetime64[us]")).dt.tz_localize("UTC"),
                   hour=np.int8(99))  # a bogus `hour` column: the FM must not read it
    for tz in ("UTC", "Asia/Shanghai", "-03:00"):
        cfg = FMConfig.small(**toy_config_kwargs(20), max_history=50, time_zone=tz)
        h = UserHistories.from_events(ev, cfg.surfaces)
        req_ts = np.array([0, -1, int(ts.max()) + 1])
        b = collate(h, cfg, np.array([0, 1, 2]), req_ts, np.array([0, 2, 3, 4]),
                    np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1]))
        want_tgt = hour_of_day(req_ts, tz)
        assert b.tgt_hour[0, :2].tolist() == [want_tgt[0]] * 2
        assert b.tgt_hour[1, 0] == want_tgt[1] and b.tgt_hour[2, 0] == want_tgt[2]
        for row, user in enumerate([0, 1, 2]):
            past = h.before(user, int(req_ts[row]), 50)
            n = len(past)
            assert b.hist_hour[row, :n].tolist() == hour_of_day(past.ts_us, tz).tolist()
    assert hour_of_day(np.array([-1]), "UTC")[0] == 23  # what the -1 request above read


def test_a_request_one_microsecond_across_an_hour_changes_only_the_hour():
    ev = toy_events(n_users=4, n_items=20, n_requests=40, n_candidates=2, seed=6)
    cfg = FMConfig.small(**toy_config_kwargs(20), max_history=16, time_zone="Asia/Shanghai")
    torch.manual_seed(0)
    from fm import FoundationModel

    model = FoundationModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    engine = TAEEngine(model, UserHistories.from_events(ev, cfg.surfaces))
    local_midnight = to_us(datetime(2024, 2, 1, 16, tzinfo=UTC))  # 00:00 in Shanghai
    items = np.array([1, 2])
    before = engine.compute_request(1, local_midnight - 1, "feed", items)
    at = engine.compute_request(1, local_midnight, "feed", items)
    later = engine.compute_request(1, local_midnight + US_PER_HOUR - 1, "feed", items)
    assert np.abs(before - at).max() > 1e-3  # hour 23 -> hour 0
    np.testing.assert_allclose(at, later, atol=1e-6)  # same hour, same history, same gap bucket


# ---- datasets: the `hour` column is the FM's hour ---------------------------------------------


def test_synthetic_hour_is_utc_for_a_pre_1970_start_at_an_odd_time():
    events, _, spec = generate(SyntheticConfig(n_users=10, n_items=30, n_categories=3, days=2,
                                               start="1969-12-30 13:30"))
    assert spec.time_zone == "UTC"
    ts = timestamps_us(events["event_timestamp"])
    assert (ts < 0).any()
    assert (events["hour"].to_numpy() == hour_of_day(ts)).all()
    assert (events["hour"] == events["event_timestamp"].dt.hour).all()


def test_spec_time_zone_round_trips_and_old_spec_files_read_utc(tmp_path):
    spec = DatasetSpec(name="x", surfaces=["a"], main_tasks=["c"], surface_tasks={"a": ["c"]},
                       time_zone="Asia/Shanghai")
    spec.save(tmp_path / "spec.json")
    assert DatasetSpec.load(tmp_path / "spec.json") == spec
    assert spec.fm_fields()["time_zone"] == "Asia/Shanghai"
    old = json.loads((tmp_path / "spec.json").read_text())
    old.pop("time_zone")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert DatasetSpec.load(tmp_path / "old.json").time_zone == "UTC"


# ---- a KuaiRand-style event: trained, logged and served with one hour ---------------------------

# 16:30 UTC on 2022-04-25 is 00:30 of 2022-04-26 in Beijing: local hour 0, UTC hour 16.
INSTANT = datetime(2022, 4, 25, 16, 30, tzinfo=UTC)
USER, SURFACE, CANDIDATES = 1, "tab1", [2, 5, 7]


def write_kuairand_log(d) -> None:
    rng = np.random.default_rng(0)
    rows = []
    start = to_us(datetime(2022, 4, 24, 12, tzinfo=UTC)) // 1000
    for k in range(60):  # earlier events of four users, every ~25 minutes
        t = start + k * 1_500_000
        rows.append((1 + k % 4, int(rng.integers(0, 9)), 0, 0, t, int(rng.random() < 0.5),
                     0, 0, 0, 0, 0, int(rng.random() < 0.3), 9, 9, 0, 0, 0, 0, 1 + 3 * (k % 2)))
    t = to_us(INSTANT) // 1000
    for v in CANDIDATES:  # the request; hourmin 100 plays KuaiRand's rounded local hour
        rows.append((USER, v, 20220426, 100, t, 1, 0, 0, 0, 0, 0, 0, 9, 9, 0, 0, 0, 0, 1))
    (d / "log_standard_4_22_to_5_08_pure.csv").write_text(
        LOG_HEADER + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    basic = [f"{v},1,NORMAL,2022-04-10,x,0.0,1.0,1.0,1.0,1,1.0,{v % 3}" for v in range(10)]
    (d / "video_features_basic_pure.csv").write_text(BASIC_HEADER + "\n" + "\n".join(basic) + "\n")


@pytest.fixture(scope="module")
def kuairand_fm(tmp_path_factory):
    d = tmp_path_factory.mktemp("kuairand")
    write_kuairand_log(d)
    events, items, spec, _ = load_kuairand(d)
    cfg = FMConfig.small(**spec.fm_fields(), max_history=8, batch_requests=8)
    model = train_streaming(events, cfg, max_steps=3, progress=False).model
    return events, items, spec, cfg, model


def spy_hours(model) -> list:
    """Record the candidates' hours of every batch the model encodes (then encode as usual)."""
    seen: list = []
    encode = model.encode_targets

    def spy(batch, state):
        seen.extend(batch.tgt_hour[batch.tgt_mask].tolist())
        return encode(batch, state)

    model.encode_targets = spy
    return seen


def trained_taes(events, cfg, model):
    """The request at INSTANT as a training batch: its hours and the TAEs the FM learns from."""
    h = UserHistories.from_events(events, cfg.surfaces)
    reqs = Requests.from_events(events, cfg)
    r = int(np.flatnonzero((reqs.ts_us == to_us(INSTANT)) & (reqs.user_id == USER))[0])
    b = reqs.batch(r, r + 1, h, cfg)
    assert reqs.item[reqs.offsets[r]:reqs.offsets[r + 1]].tolist() == CANDIDATES
    with torch.no_grad():
        return b, model(b)[b.tgt_mask].numpy()


def test_kuairand_event_gets_its_local_hour_in_training_and_serving(kuairand_fm):
    events, _, spec, cfg, model = kuairand_fm
    assert spec.time_zone == "Asia/Shanghai" and cfg.time_zone == "Asia/Shanghai"
    at = events[events["event_timestamp"] == pd.Timestamp(INSTANT)]
    assert at["hour"].tolist() == [0, 0, 0]  # local hour; not hourmin's 1, not UTC's 16
    b, want = trained_taes(events, cfg, model)
    assert b.tgt_hour[b.tgt_mask].tolist() == [0, 0, 0]
    n = int(b.hist_len[0])
    past = UserHistories.from_events(events, cfg.surfaces).before(USER, to_us(INSTANT), 8)
    assert b.hist_hour[0, :n].tolist() == hour_of_day(past.ts_us, "Asia/Shanghai").tolist()
    assert b.hist_hour[0, :n].tolist() != hour_of_day(past.ts_us, "UTC").tolist()

    engine = TAEEngine(model, UserHistories.from_events(events, spec.surfaces))
    seen = spy_hours(engine.model)
    got = engine.compute_request(USER, to_us(INSTANT), SURFACE, np.array(CANDIDATES))
    del engine.model.encode_targets  # back to the class's method
    assert seen == [0, 0, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_logged_served_and_trained_taes_agree_for_one_instant(kuairand_fm, tmp_path, redis_url):
    """`foundex log`'s path (log_version over the FM tier) and read-through's (FMTier.compute
    with the request's datetime) store and serve the TAE training computed, hour included."""
    from conftest import copy_feature_repo

    from store_bridge.fm_tier import FMTier, load_tae_function, repo_histories
    from store_bridge.logging_tier import log_version, prepare_impressions
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import redis_client
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest
    from store_bridge.streams.histories import OnlineHistories

    events, items, spec, cfg, model = kuairand_fm
    _, want = trained_taes(events, cfg, model)
    repo = FeatureRepo(copy_feature_repo(tmp_path / "repo"))
    write_dataset(repo.events_dir, events, items, spec)
    repo.checkpoints_dir.mkdir(parents=True)
    ckpt = save_checkpoint(model, repo.checkpoints_dir / "v1.pt", {"steps": 3})
    entry = FMVersion(version="v1", dim=cfg.d_model, checkpoint="checkpoints/v1.pt",
                      digest=checkpoint_digest(ckpt), training_window=("2022-04-24", "2022-04-26"),
                      created_at="2022-04-26")
    repo.save_manifest(Manifest(versions={"v1": entry}))

    # logging: impressions carry a wrong `hour` (the UTC one); it is ignored
    imp = prepare_impressions(pd.DataFrame({
        "user_id": [USER] * 3, "item_id": CANDIDATES,
        "event_timestamp": [pd.Timestamp(INSTANT)] * 3, "surface": [SURFACE] * 3, "hour": [16] * 3,
    }))
    tae_fn = load_tae_function(repo, entry, repo_histories(repo))
    seen_log = spy_hours(tae_fn.engine.model)
    store = RedisEmbeddingStore(redis_client(redis_url), "tz_agree")
    rep = log_version(repo, store, "v1", tae_fn, imp, progress=False)
    assert rep.rows == 3 and rep.unknown_items == 0 and seen_log == [0, 0, 0]
    files = sorted(repo.tae_dir("v1").glob("*/*.parquet"))
    assert [f.parent.name for f in files] == ["2022-04-25"]  # partitions are UTC days
    logged = pq.read_table(files[0]).to_pandas().set_index("item_id").loc[CANDIDATES]
    np.testing.assert_allclose(np.stack(logged["embedding"]), want, atol=1e-5)

    # read-through: the route hands the FM tier the request's datetime; the tier reads the
    # user's history from the online histories, seeded from the same log
    online = OnlineHistories(redis_client(redis_url), "tz_agree", spec.surfaces)
    online.backfill(events)
    tier = FMTier(repo, online)
    assert tier.surfaces(entry) is not None
    seen_serve = spy_hours(tier._engine(entry).engine.model)
    served = tier.compute(entry, USER, np.array(CANDIDATES), SURFACE, INSTANT)
    assert served.positions.tolist() == [0, 1, 2] and seen_serve == [0, 0, 0]
    np.testing.assert_allclose(served.taes, want, atol=1e-5)
    np.testing.assert_allclose(served.taes, np.stack(logged["embedding"]), atol=1e-6)
    read = store.read("v1", cfg.d_model, USER, np.array(CANDIDATES))
    np.testing.assert_array_equal(read.matrix, np.stack(logged["embedding"]).astype(np.float32))


def test_logging_partitions_far_and_pre_1970_instants_by_utc_day(tmp_path, redis_url):
    from conftest import copy_feature_repo

    from store_bridge.logging_tier import log_version
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import redis_client
    from store_bridge.repo import FeatureRepo

    repo = FeatureRepo(copy_feature_repo(tmp_path / "repo"))
    stamps = np.array([-1, 0, to_us(datetime(2500, 1, 1, 23, 59, 59, 999999))], np.int64)
    # Built as prepare_impressions's output: it now refuses such times at the input (the
    # training-set range); the write path still partitions any instant by its UTC day.
    imp = pd.DataFrame({
        "user_id": [1, 2, 3], "item_id": [4, 5, 6],
        "event_timestamp": pd.Series(stamps.astype("datetime64[us]")).dt.tz_localize("UTC"),
        "surface": ["feed"] * 3,
    })

    def fm(u, i, t, s):
        return np.ones((len(u), 4), np.float32) * t[:, None].astype(np.float32)

    rep = log_version(repo, RedisEmbeddingStore(redis_client(redis_url), "tz_days"), "v1", fm,
                      imp, progress=False)
    assert rep.rows == 3
    days = sorted(p.parent.name for p in repo.tae_dir("v1").glob("*/*.parquet"))
    assert days == ["1969-12-31", "1970-01-01", "2500-01-01"]
    back = pd.concat(pq.read_table(p).to_pandas() for p in repo.tae_dir("v1").glob("*/*.parquet"))
    assert sorted(timestamps_us(back["event_timestamp"]).tolist()) == sorted(stamps.tolist())
