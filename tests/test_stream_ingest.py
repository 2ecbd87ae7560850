"""Ingestion into the events stream: POST /v1/events over HTTP (uvicorn on loopback), and
`foundex ingest` + `foundex consume` as real processes, on a real Redis.

Each test has its own repo (a minimal one: the Feast files and a dataset spec) under its own
Feast project, so its stream and histories never meet another test's keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pandas as pd
import pytest

from api.app import create_app
from api.services.consumers import build_consumer, live_log_dir
from api.services.context import ServiceContext
from api.settings import Settings
from store_bridge.events.schema import DatasetSpec
from store_bridge.streams.offline_log import live_log_schema, read_live_log
from store_bridge.streams.records import content_ids
from tests.conftest import ROOT, LiveServer, copy_feature_repo, free_port

SPEC = DatasetSpec(
    name="live", surfaces=["home", "search"], main_tasks=["click"],
    surface_tasks={"home": ["click", "like"], "search": ["click"]}, n_actions=4,
)  # fmt: skip
EVENTS = "/v1/events"


def live_repo(path: Path, *, spec: DatasetSpec | None = SPEC) -> Path:
    """The Feast files and a dataset spec, under a Feast project of its own."""
    repo = copy_feature_repo(path)
    yaml_path = repo / "feature_store.yaml"
    project = f"live_{uuid.uuid4().hex[:10]}"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", f"project: {project}"))
    (repo / "data" / "events").mkdir(parents=True)
    if spec is not None:
        spec.save(repo / "data" / "events" / "spec.json")
    return repo


def canonical_events(n: int, *, seed: int = 0, days: int = 3, users: int = 20) -> pd.DataFrame:
    """`n` events in the canonical schema over `days` days, in random (not time) order."""
    rng = np.random.default_rng(seed)
    t0 = pd.Timestamp("2026-01-05", tz="UTC")
    offsets = pd.to_timedelta(rng.integers(0, days * 86_400_000_000, n), unit="us")
    return pd.DataFrame({
        "request_id": np.arange(n, dtype=np.int64),
        "user_id": rng.integers(0, users, n),
        "item_id": rng.integers(0, 10_000, n),
        "event_timestamp": (t0 + offsets).astype("datetime64[us, UTC]"),
        "surface": rng.choice(SPEC.surfaces, n),
        "hour": np.zeros(n, np.int8),
        "action": rng.integers(0, SPEC.n_actions, n).astype(np.int16),
        "click": rng.integers(0, 2, n).astype(np.float32),
        "like": np.where(rng.random(n) < 0.5, np.nan, 1.0).astype(np.float32),
    })  # fmt: skip


def derived_ids(df: pd.DataFrame) -> np.ndarray:
    ts = df["event_timestamp"].to_numpy(dtype="datetime64[us]").view(np.int64)
    return content_ids(df["user_id"].to_numpy(), df["item_id"].to_numpy(), ts,
                       df["surface"].to_numpy(), df["action"].to_numpy())  # fmt: skip


def context(repo: Path, redis_url: str, **settings) -> ServiceContext:
    return ServiceContext(Settings(repo=repo, redis_url=redis_url, **settings), redis_url,
                          redis_timeout_s=10)  # fmt: skip


def drain(ctx: ServiceContext, role: str) -> int:
    worker = build_consumer(ctx, role)
    try:
        return worker.drain()
    finally:
        if hasattr(worker, "close"):
            worker.close()


def json_rows(n: int) -> list[dict]:
    return [
        {"user_id": 7, "item_id": 100 + i, "event_timestamp": f"2026-01-05T10:00:0{i}Z",
         "surface": "home", "action": i % SPEC.n_actions, "labels": {"click": 1.0}}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def served(tmp_path, redis_url, request):
    """(client, repo) of the app over a fresh live repo; `@pytest.mark.parametrize("served",
    [{settings}], indirect=True)` sets settings."""
    repo = live_repo(tmp_path / "repo")
    kw = getattr(request, "param", {})
    app = create_app(Settings(repo=repo, redis_url=redis_url, **kw), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, repo


# --- REST --------------------------------------------------------------------------------------


def test_a_clean_batch_is_200_with_ids_in_input_order(served, redis_url):
    client, repo = served
    rows = json_rows(4)
    rows[1]["event_id"] = "client-1"
    rows[2]["event_timestamp"] = 1_767_607_200_000_000  # integer µs: 2026-01-05T10:00:00Z
    rows[3]["event_timestamp"] = "2026-01-05T18:00:03+08:00"  # the same instant as 10:00:03Z
    r = client.post(EVENTS, json={"events": rows})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["accepted"] == 4 and out["duplicates"] == 0
    assert out["event_ids"][1] == "client-1"
    assert [i.startswith("c-") for i in out["event_ids"]] == [True, False, True, True]

    ctx = context(repo, redis_url)
    assert drain(ctx, "histories") == 4 and drain(ctx, "offline") == 4
    log = read_live_log(live_log_dir(ctx)).set_index("event_id")
    assert list(log.loc[out["event_ids"], "item_id"]) == [100, 101, 102, 103]
    times = log.loc[out["event_ids"], "event_timestamp"]
    assert times.iloc[2] == pd.Timestamp("2026-01-05T10:00:00Z")
    assert times.iloc[3] == pd.Timestamp("2026-01-05T10:00:03Z")
    assert log.loc[out["event_ids"][0], "click"] == 1.0 and np.isnan(log["like"]).all()
    assert sorted(ctx.histories.read(7).item.tolist()) == [100, 101, 102, 103]


def test_a_bad_row_is_refused_alone_and_a_resend_is_deduplicated(served, redis_url):
    client, repo = served
    rows = json_rows(5)
    rows[3]["surface"] = "nowhere"
    r = client.post(EVENTS, json={"events": rows})
    assert r.status_code == 422, r.text
    out = r.json()
    assert "row 3 surface" in out["detail"] and "1 of 5 events rejected" in out["detail"]
    assert out["accepted"] == 4 and out["duplicates"] == 0 and len(out["event_ids"]) == 4
    assert [(x["row"], x["field"]) for x in out["rejected"]] == [(3, "surface")]
    assert "nowhere" not in r.text  # the value is never quoted back

    again = client.post(EVENTS, json={"events": rows}).json()
    assert (again["accepted"], again["duplicates"]) == (4, 4)
    assert again["event_ids"] == out["event_ids"]
    rows[3]["surface"] = "search"
    fixed = client.post(EVENTS, json={"events": rows})
    assert fixed.status_code == 200 and fixed.json()["duplicates"] == 4

    ctx = context(repo, redis_url)
    assert ctx.events_stream.produced() == 5  # each event appended once
    metrics = client.get("/metrics").text
    assert "foundex_events_ingested_total 5.0" in metrics
    assert "foundex_events_rejected_total 2.0" in metrics
    assert "foundex_events_duplicates_total 8.0" in metrics


def test_each_bad_field_is_named_and_valid_rows_still_go_in(served):
    client, _ = served
    good = json_rows(1)[0]
    cases = [  # (row change, field named)
        ({"user_id": "7"}, "user_id"),
        ({"user_id": 2**63}, "user_id"),
        ({"event_timestamp": "2026-01-05T10:00:00"}, "event_timestamp"),  # no zone
        ({"event_timestamp": "yesterday"}, "event_timestamp"),
        ({"event_timestamp": 1.5}, "event_timestamp"),
        ({"action": SPEC.n_actions}, "action"),
        ({"action": True}, "action"),
        ({"labels": {"unknown_task": 1}}, "labels.unknown_task"),
        ({"labels": {"click": "yes"}}, "labels.click"),
        ({"click": 1.0}, "click"),  # a label outside `labels`
        ({"event_id": "c-mine"}, "event_id"),
        ({"event_id": "x" * 129}, "event_id"),
        ({"request_id": None}, "request_id"),
    ]
    rows = [good]
    for i, (change, _) in enumerate(cases):
        rows.append({**good, "item_id": 1000 + i, **change})
    rows.append({k: v for k, v in good.items() if k != "surface"})
    rows.append(17)
    r = client.post(EVENTS, json={"events": rows})
    assert r.status_code == 422, r.text
    out = r.json()
    named = [(x["row"], x["field"]) for x in out["rejected"]]
    expected = [(i + 1, f) for i, (_, f) in enumerate(cases)]
    assert named == [*expected, (len(cases) + 1, "surface"), (len(cases) + 2, "event")]
    assert out["accepted"] == 1 and len(out["event_ids"]) == 1
    assert f"(and {len(named) - 5} more rows)" in out["detail"]
    assert "\n" not in out["detail"]


def test_bodies_that_are_not_a_batch_are_refused_whole(served):
    client, _ = served
    for body, needle in [({"events": []}, "events"), ({"events": {}}, "events"),
                         ({"event": json_rows(1)}, "events: required"), ([1], "JSON object")]:
        r = client.post(EVENTS, json=body)
        assert r.status_code == 422, r.text
        assert set(r.json()) == {"detail"} and needle in r.json()["detail"]


def test_no_dataset_spec_is_409_and_a_dead_redis_is_503(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo", spec=None)
    app = create_app(Settings(repo=repo, redis_url=redis_url), redis_url)
    with LiveServer(app) as server:
        r = httpx.post(server.url + EVENTS, json={"events": json_rows(1)}, timeout=30)
    assert r.status_code == 409 and "no dataset spec" in r.json()["detail"]

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    repo = live_repo(tmp_path / "repo2")
    with LiveServer(create_app(Settings(repo=repo, redis_url=dead), dead)) as server:
        r = httpx.post(server.url + EVENTS, json={"events": json_rows(2)}, timeout=30)
    assert r.status_code == 503, r.text
    assert "the first 0 of these 2 events were taken in" in r.json()["detail"]


@pytest.mark.parametrize("served", [{"stream_max_entries": 2, "stream_batch_events": 2}],
                         indirect=True)
def test_a_full_stream_is_429_and_nothing_is_dropped(served, redis_url):
    client, repo = served
    rows = json_rows(9)
    for i, (a, b) in enumerate([(0, 2), (2, 3)]):  # two entries: the stream is full
        assert client.post(EVENTS, json={"events": rows[a:b]}).status_code == 200, i
    r = client.post(EVENTS, json={"events": rows[3:5]})
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    detail = r.json()["detail"]
    assert set(r.json()) == {"detail"}
    assert "is full" in detail and "foundex consume" in detail and "none of these" in detail

    ctx = context(repo, redis_url, stream_max_entries=2, stream_batch_events=2)
    # One group catching up frees nothing: an entry stays until every group has it.
    assert drain(ctx, "histories") == 3
    assert client.post(EVENTS, json={"events": rows[3:5]}).status_code == 429
    assert drain(ctx, "offline") == 3
    # Room for two entries of three: those go in, the 429 says so, a resend completes it.
    r = client.post(EVENTS, json={"events": rows[3:9]})
    assert r.status_code == 429 and "the first 4 of these 6 events were taken in" in r.json()["detail"]
    assert drain(ctx, "histories") == 4 and drain(ctx, "offline") == 4
    r = client.post(EVENTS, json={"events": rows[3:9]})
    assert r.status_code == 200 and (r.json()["accepted"], r.json()["duplicates"]) == (6, 4)
    assert drain(ctx, "histories") == 2 and drain(ctx, "offline") == 2

    log = read_live_log(live_log_dir(ctx))
    assert sorted(log["item_id"]) == [100 + i for i in range(9)]  # every event, once
    assert sorted(ctx.histories.read(7).item.tolist()) == [100 + i for i in range(9)]
    assert ctx.events_stream.produced() == 9


# --- the CLI, as real processes -----------------------------------------------------------------


def foundex(*args: str, redis_url: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "REDIS_URL": redis_url, **(env or {})}
    full_env.pop("FOUNDEX_REPO", None)
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_ingest_a_parquet_log_then_consume_both_roles(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo")
    events = canonical_events(3000, seed=3)
    events.loc[17, "surface"] = "nowhere"
    events.loc[2500, "action"] = SPEC.n_actions
    path = tmp_path / "events.parquet"
    events.to_parquet(path)

    r = foundex("ingest", str(path), "--repo", str(repo), "--no-progress", redis_url=redis_url)
    assert r.returncode == 1, r.stderr  # rows were rejected
    assert "rejected row 17 surface: not a surface of the dataset" in r.stderr
    assert "rejected row 2500 action" in r.stderr
    assert "2,998 events accepted (0 duplicates), 2 rejected" in r.stdout

    for role in ("histories", "offline"):
        r = foundex("consume", role, "--repo", str(repo), "--once", redis_url=redis_url)
        assert r.returncode == 0, r.stderr
        assert f"consume {role}: 2,998 events handled" in r.stdout and "lag 0 events" in r.stdout

    good = events.drop(index=[17, 2500])
    ids = derived_ids(good)
    live = live_log_dir(context(repo, redis_url))
    log = read_live_log(live)
    assert len(log) == len(good) and set(log["event_id"]) == set(ids)
    assert pa_schema_of(live) == live_log_schema(SPEC.all_tasks)
    n, distinct = duckdb.sql(
        f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{live}/*/*.parquet')"
    ).fetchall()[0]
    assert n == distinct == len(good)
    days = sorted(p.name for p in live.iterdir() if p.is_dir())
    assert days == ["2026-01-05", "2026-01-06", "2026-01-07"]
    for day in days:  # each file holds its own date's events only
        part = pd.read_parquet(live / day)
        assert (part["event_timestamp"].dt.strftime("%Y-%m-%d") == day).all()

    ctx = context(repo, redis_url)
    for user, mine in good.groupby("user_id"):
        h = ctx.histories.read(int(user))
        want = sorted(zip(mine["event_timestamp"].to_numpy(dtype="datetime64[us]").view(np.int64),
                          mine["item_id"], strict=True))  # fmt: skip
        assert sorted(zip(h.ts_us.tolist(), h.item.tolist(), strict=True)) == want

    # A rerun is recognised event by event: nothing new reaches the stream or the log.
    r = foundex("ingest", str(path), "--repo", str(repo), "--no-progress", redis_url=redis_url)
    assert "2,998 events accepted (2,998 duplicates)" in r.stdout
    r = foundex("consume", "offline", "--repo", str(repo), "--once", redis_url=redis_url)
    assert "0 events handled" in r.stdout and len(read_live_log(live)) == len(good)


def test_ingest_waits_on_a_full_stream_until_consumers_catch_up(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo")
    events = canonical_events(2000, seed=4)
    path = tmp_path / "events.parquet"
    events.to_parquet(path)
    env = {**os.environ, "REDIS_URL": redis_url, "FOUNDEX_STREAM_MAX_ENTRIES": "3",
           "FOUNDEX_STREAM_BATCH_EVENTS": "100"}  # 20 entries into room for 3
    cmd = [sys.executable, "-m", "api.cli"]
    ingesting = subprocess.Popen([*cmd, "ingest", str(path), "--repo", str(repo)], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
    consumers: list[subprocess.Popen] = []
    try:
        line = ingesting.stderr.readline()  # blocks until it reports the wait
        assert line.startswith("waiting on consumers: stream 'events' is full"), line
        consumers = [subprocess.Popen([*cmd, "consume", role, "--repo", str(repo), "--lag-every",
                                       "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
                     for role in ("histories", "offline")]  # fmt: skip
        out, err = ingesting.communicate(timeout=300)
        assert ingesting.returncode == 0, err
        assert "2,000 events accepted (0 duplicates), 0 rejected" in out
        ctx = context(repo, redis_url)
        deadline = time.monotonic() + 120
        while any(g.events for g in ctx.events_stream.lag()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in consumers:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, proc.stdout.read()
    finally:
        for proc in [ingesting, *consumers]:
            if proc.poll() is None:
                proc.kill()
    log = read_live_log(live_log_dir(ctx))
    assert len(log) == 2000 and set(log["event_id"]) == set(derived_ids(events))
    stored = sum(len(ctx.histories.read(u)) for u in events["user_id"].unique())
    assert stored == 2000


def pa_schema_of(live: Path):
    import pyarrow.dataset as ds

    schemas = {ds.dataset(p).schema.remove_metadata() for p in live.glob("*/*.parquet")}
    assert len(schemas) == 1, schemas  # every file the same columns and types
    return schemas.pop()


def test_ingest_refuses_files_it_cannot_read_as_a_whole(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo")
    events = canonical_events(10)
    naive = events.assign(event_timestamp=events["event_timestamp"].dt.tz_localize(None))
    cases = {
        "naive.parquet": (naive, "has no time zone"),
        "missing.parquet": (events.drop(columns=["surface"]), "lack columns ['surface']"),
        "extra.parquet": (events.assign(score=1.0), "columns ['score'] are neither"),
    }
    for name, (frame, needle) in cases.items():
        frame.to_parquet(tmp_path / name)
        r = foundex("ingest", str(tmp_path / name), "--repo", str(repo), redis_url=redis_url)
        assert r.returncode == 2 and needle in r.stderr, (name, r.stderr)
        assert r.stderr.strip().count("\n") == 0, r.stderr  # one line

    # CSV: times are text; one without a zone is a bad row, not a bad file.
    csv = events.copy()
    csv["event_timestamp"] = csv["event_timestamp"].astype(str)
    csv.loc[4, "event_timestamp"] = "2026-01-05 10:00:00"
    csv.to_csv(tmp_path / "events.csv", index=False)
    r = foundex("ingest", str(tmp_path / "events.csv"), "--repo", str(repo), "--rate", "1000",
                redis_url=redis_url)  # fmt: skip
    assert r.returncode == 1 and "rejected row 4 event_timestamp: has no time zone" in r.stderr
    assert "9 events accepted" in r.stdout

    r = foundex("consume", "nope", "--repo", str(repo), redis_url=redis_url)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown consumer role 'nope' (roles: histories, offline, logging, join)"
