"""`foundex bench stream`: the live loop measured in one run, on a repo of its own.

The repo is built here: the tiny demo's synthetic log, one small FM trained over its first 60%
and published as v1 (`feast apply`), every user's history seeded into Redis. Then, with the
stream consumers running as real `foundex consume <role>` processes:

1. **Ingestion**: N synthetic events in the canonical schema go through the `ingest` use-case
   in-process, in calls of `stream_batch_events` rows as `foundex ingest` makes them, while
   `consume histories` and `consume offline` run. Measured: events/s ingested, the seconds
   until each group's lag is 0 (the rate at which it keeps up), and the lag sampled every
   0.1 s meanwhile (`RedisStream.lag`: events behind, oldest unacknowledged age).
2. **The producer alone**, beside its peers, each with no consumer running, into the streams
   of a scratch repo (its own Feast project, the same dataset spec) on the same Redis: the same
   events through the `ingest` use-case; the naive design, one XADD per event (redis-py
   pipeline of 1000 commands; no validation, no dedup: its best case); REST `POST /v1/events`
   through `foundex serve` in batches of 1000 events. Also the Redis memory per event of the
   two stream layouts (`MEMORY USAGE` of the stream; the dedup keys not included).
3. **Event-to-TAE visibility**: `store_bridge.streams.visibility.measure_visibility`: an event
   appended, a TAE served for its user polled until it reflects the event.
4. **Data-to-trainer**: lookups through the lookup use-case (in-process, read-through on) log
   their impressions (impressions stream), `consume logging` writes their TAEs and opens them
   for the join; feedback for some of them is ingested in small paced batches; `consume join`
   writes training rows, whose `data_to_trainer_us` (feedback ingested -> its training row
   written) is read back.

A table, and the result as a dict (the CLI prints it as one JSON line). Subprocesses run in
their own process groups and are always stopped (SIGTERM, then SIGKILL). On a Redis given by
REDIS_URL, the bench's keys (Feast projects `foundex_sbench_<random>`) are deleted at the end
unless `keep`; with its own embedded server, the server goes.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from api.services.context import ServiceContext
    from store_bridge.events.schema import DatasetSpec
    from store_bridge.repo import FeatureRepo, FMVersion
    from store_bridge.streams.stream import RedisStream

ROOT = Path(__file__).resolve().parent.parent
GOAL_EVENTS_PER_S = 20_000  # issue 13: ingested while histories and the offline log keep up
REST_BATCH = 1000  # events per POST /v1/events
NAIVE_PIPELINE = 1000  # XADDs per pipeline round trip
FEEDBACK_BATCH = 10  # feedback events per ingest call
FEEDBACK_PACE_S = 0.05  # between feedback batches: many batches make a distribution
LOOKUP_ITEMS = 20  # candidates per lookup of the data-to-trainer phase


@dataclass
class StreamBenchConfig:
    """events: synthetic events ingested (and XADDed by the naive peer); probes: visibility
    probes; rest_events: events POSTed through `foundex serve` (0: no REST peer); feedback:
    feedback events joined to served impressions; users: distinct users of the synthetic
    events; redis_url: a server to use (None: an embedded redis-server of its own)."""

    events: int = 200_000
    probes: int = 100
    rest_events: int = 20_000
    feedback: int = 200
    users: int = 20_000
    redis_url: str | None = None
    keep: bool = False

    def __post_init__(self) -> None:
        for name, low in (("events", 1), ("probes", 1), ("rest_events", 0), ("feedback", 1),
                          ("users", 1)):  # fmt: skip
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


# --- processes -----------------------------------------------------------------------------------


class Worker:
    """A `foundex` subprocess in its own process group; its output goes to `<name>.log`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check(self) -> None:
        """RuntimeError (with the end of its output) when the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def stop(self, timeout_s: float = 15.0) -> str:
        """SIGTERM (a consumer finishes its batch), SIGKILL after `timeout_s` -> the last line
        of its output."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        lines = [s for s in self.tail().splitlines() if s.strip()]
        return lines[-1] if lines else ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def wait_registered(stream: RedisStream, group: str, worker: Worker, timeout_s: float = 180) -> None:
    """Until `worker`'s consumer (named after its group) has read from `stream` once: it is
    up, its group exists. RuntimeError if the process exits, TimeoutError after `timeout_s`."""
    import redis

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.check()
        try:
            names = {_text(c["name"]) for c in stream.client.xinfo_consumers(stream.key, group)}
        except redis.ResponseError:  # no stream or group yet
            names = set()
        if group in names:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{worker.name} did not start consuming within {timeout_s:.0f} s")


def wait_caught_up(
    stream: RedisStream, groups: tuple[str, ...], since: float, *, timeout_s: float,
    workers: tuple[Worker, ...] = (),
) -> dict[str, float]:  # fmt: skip
    """Seconds from `since` (a perf_counter reading) until each group's lag is 0 events.
    Raises TimeoutError after `timeout_s`, RuntimeError when a worker exited."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        lag = {g.group: g.events for g in stream.lag()}
        now = time.perf_counter()
        for g in groups:
            if g not in done and lag.get(g) == 0:
                done[g] = now - since
        if len(done) == len(groups):
            return done
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream.name}: groups {sorted(set(groups) - set(done))} still "
                               f"behind after {timeout_s:.0f} s (lag {lag})")
        for w in workers:
            w.check()
        time.sleep(0.01)


@dataclass
class LagSampler:
    """Samples `stream.lag()` every `every_s` in a thread; keeps each group's maxima."""

    stream: RedisStream
    every_s: float = 0.1
    max_events: dict[str, int] = field(default_factory=dict)
    max_oldest_s: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-lag", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for g in self.stream.lag():
                self.max_events[g.group] = max(self.max_events.get(g.group, 0), g.events)
                self.max_oldest_s[g.group] = max(self.max_oldest_s.get(g.group, 0.0),
                                                 g.oldest_unacked_s)
            self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --- the repo and the events ---------------------------------------------------------------------


def build_repo(path: Path, redis_url: str, say: Callable[[str], None]) -> FeatureRepo:
    """A repo under a Feast project of its own with one published FM version (v1, small, over
    the first 60% of the tiny demo's synthetic log) and every user's history seeded online."""
    from api.pipeline import DemoSize
    from api.services.context import ServiceContext
    from api.services.histories import backfill_histories
    from api.settings import Settings
    from fm import FMConfig, save_checkpoint, train_streaming
    from store_bridge.events.files import write_dataset
    from store_bridge.events.schema import time_windows
    from store_bridge.events.synthetic import generate
    from store_bridge.repo import FeatureRepo
    from store_bridge.versions import publish

    path.mkdir(parents=True, exist_ok=True)
    for name in ["feature_store.yaml", "definitions.py", ".feastignore"]:
        shutil.copy(ROOT / "feature_repo" / name, path / name)
    yaml_path = path / "feature_store.yaml"
    project = f"foundex_sbench_{uuid.uuid4().hex[:8]}"  # Redis keys of its own
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", f"project: {project}"))
    repo = FeatureRepo(path)
    size = DemoSize.tiny()
    events, items, spec = generate(size.synthetic)
    write_dataset(repo.events_dir, events, items, spec)
    shutil.copyfile(repo.events_dir / "items.parquet", repo.data / "items.parquet")
    start, end = time_windows(events)["fm"]
    config = FMConfig.small(**spec.fm_fields(), max_history=size.fm_max_history)
    result = train_streaming(events, config, end=end, progress=False)
    ckpt = repo.data / "training" / "fm_small.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(result.model, ckpt, {"steps": result.steps})
    entry = publish(repo, ckpt, redis_url, training_window=(start.isoformat(), end.isoformat()),
                    description="bench stream: small FM")  # fmt: skip
    ctx = ServiceContext(Settings(repo=path, redis_url=redis_url), redis_url, redis_timeout_s=30)
    try:
        seeded = backfill_histories(ctx)
    finally:
        ctx.close()
    say(f"repo {path} (project {project}): {len(events):,} events, {spec.n_users} users, "
        f"FM {entry.version} (dim {entry.dim}, {result.steps} steps), {seeded:,} history rows")
    return repo


def scratch_repo(path: Path, repo: FeatureRepo) -> Path:
    """A repo folder holding only `repo`'s Feast config (under the project `<project>_scratch`)
    and its dataset spec: ingestion into it fills streams no consumer reads."""
    (path / "data" / "events").mkdir(parents=True, exist_ok=True)
    text = (repo.path / "feature_store.yaml").read_text()
    (path / "feature_store.yaml").write_text(
        text.replace(f"project: {repo.project}", f"project: {repo.project}_scratch")
    )
    shutil.copy(repo.events_dir / "spec.json", path / "data" / "events" / "spec.json")
    return path


def synthetic_events(
    spec: DatasetSpec, n: int, *, users: int, end_us: int, span_s: float = 3600.0, seed: int = 0
) -> pd.DataFrame:
    """`n` events in the canonical schema (no hour, no event_id: ingestion derives both):
    users 1..`users`, the spec's items, surfaces and actions, times evenly spaced (distinct)
    over the `span_s` seconds before `end_us`, Bernoulli(0.1) labels on each row's surface's
    tasks (NaN elsewhere, as in the event log)."""
    from store_bridge.events.schema import EVENT_TIMESTAMP

    rng = np.random.default_rng(seed)
    step = max(1, int(span_s * 1e6) // n)
    ts = end_us - step * np.arange(n, 0, -1, dtype=np.int64)
    surface = rng.integers(0, len(spec.surfaces), n)
    frame = pd.DataFrame({
        "request_id": np.arange(n, dtype=np.int64),
        "user_id": rng.integers(1, users + 1, n, dtype=np.int64),
        "item_id": rng.integers(0, spec.n_items, n, dtype=np.int64),
        EVENT_TIMESTAMP: pd.to_datetime(ts, unit="us", utc=True).astype("datetime64[us, UTC]"),
        "surface": np.array(spec.surfaces, dtype=object)[surface],
        "action": rng.integers(0, spec.n_actions, n).astype(np.int16),
    })  # fmt: skip
    for task in spec.all_tasks:
        on = np.isin(surface, [i for i, s in enumerate(spec.surfaces)
                               if task in spec.surface_tasks.get(s, [])])  # fmt: skip
        frame[task] = np.where(on, (rng.random(n) < 0.1).astype(np.float32), np.nan).astype(
            np.float32
        )
    return frame


# --- the phases ----------------------------------------------------------------------------------


def ingest_phase(
    ctx: ServiceContext, frame: pd.DataFrame, lag_stream: RedisStream, workers: tuple[Worker, ...]
) -> dict:
    """The events through `ingest` in calls of `stream_batch_events` rows while the consumer
    processes run; then until `histories` and `offline` have caught up."""
    from api.services.events import ingest

    size = ctx.settings.stream_batch_events
    groups = ("histories", "offline")
    new = 0
    with LagSampler(lag_stream) as lag:
        t0 = time.perf_counter()
        for start in range(0, len(frame), size):
            out = ingest(ctx, frame.iloc[start : start + size])
            if out.rejected:
                raise RuntimeError(f"bench events rejected: {out.summary()}")
            new += out.new
        ingest_s = time.perf_counter() - t0
        caught = wait_caught_up(lag_stream, groups, t0, timeout_s=max(300.0, len(frame) / 500),
                                workers=workers)  # fmt: skip
    n = len(frame)
    return {
        "events": n, "appended": new, "call_events": size, "seconds": round(ingest_s, 3),
        "events_per_s": round(n / ingest_s),
        "keep_up": {g: {"caught_up_s": round(caught[g], 3), "events_per_s": round(n / caught[g])}
                    for g in groups},
        "end_to_end_events_per_s": round(n / max(caught.values())),
        "max_lag": {g: {"events": lag.max_events.get(g, 0),
                        "oldest_unacked_s": round(lag.max_oldest_s.get(g, 0.0), 3)}
                    for g in groups},
        "lag_samples": lag.samples,
    }  # fmt: skip


def _drop_stream(stream: RedisStream) -> int:
    """Delete a scratch stream and its counters -> the stream's bytes in Redis before."""
    client = stream.client
    memory = int(client.memory_usage(stream.key, samples=0) or 0)
    acked = [f"{stream.key.rsplit(':', 1)[0]}:acked:{g}" for g in stream.groups]
    client.delete(stream.key, stream.produced_key, *acked)
    return memory


def producer_phase(ctx: ServiceContext, frame: pd.DataFrame) -> dict:
    """The events through `ingest` as in `ingest_phase`, into `ctx`'s events stream, which no
    consumer reads (a scratch repo's): the producer's own cost."""
    from api.services.events import ingest

    size = ctx.settings.stream_batch_events
    t0 = time.perf_counter()
    for start in range(0, len(frame), size):
        ingest(ctx, frame.iloc[start : start + size])
    seconds = time.perf_counter() - t0
    held = ctx.events_stream.produced()
    memory = _drop_stream(ctx.events_stream)
    return {"events": len(frame), "call_events": size, "seconds": round(seconds, 3),
            "events_per_s": round(len(frame) / seconds),
            "redis_bytes_per_event": round(memory / max(1, held), 1)}  # fmt: skip


def naive_phase(client, project: str, frame: pd.DataFrame) -> dict:
    """One XADD per event of `frame` (flat string fields, ids derived as ingestion derives
    them), NAIVE_PIPELINE commands per round trip, into a scratch stream deleted after."""
    from fm.timefeatures import timestamps_us
    from store_bridge.events.schema import EVENT_TIMESTAMP
    from store_bridge.streams.records import content_ids

    key = f"foundex:{{{project}:naive}}:stream"
    client.delete(key)
    labels = [c for c in frame.columns if frame[c].dtype == np.float32]
    t0 = time.perf_counter()
    ts = timestamps_us(frame[EVENT_TIMESTAMP])
    cols = {
        "user_id": frame["user_id"].to_numpy(), "item_id": frame["item_id"].to_numpy(),
        EVENT_TIMESTAMP: ts, "surface": frame["surface"].to_numpy(object),
        "action": frame["action"].to_numpy(),
        "event_id": content_ids(frame["user_id"].to_numpy(), frame["item_id"].to_numpy(), ts,
                                frame["surface"].to_numpy(object), frame["action"].to_numpy()),
        **{t: frame[t].to_numpy() for t in labels},
    }  # fmt: skip
    rows = [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]
    for start in range(0, len(rows), NAIVE_PIPELINE):
        with client.pipeline(transaction=False) as pipe:
            for row in rows[start : start + NAIVE_PIPELINE]:
                pipe.xadd(key, {k: str(v) for k, v in row.items() if v == v})  # NaN left out
            pipe.execute()
    seconds = time.perf_counter() - t0
    length = int(client.xlen(key))
    memory = int(client.memory_usage(key, samples=0) or 0)
    client.delete(key)
    if length != len(frame):
        raise RuntimeError(f"naive stream holds {length} entries, sent {len(frame)}")
    return {"events": len(frame), "seconds": round(seconds, 3),
            "events_per_s": round(len(frame) / seconds),
            "redis_bytes_per_event": round(memory / max(1, length), 1)}  # fmt: skip


def _json_events(frame: pd.DataFrame, tasks: list[str]) -> list[dict]:
    from fm.timefeatures import timestamps_us
    from store_bridge.events.schema import EVENT_TIMESTAMP

    ts = timestamps_us(frame[EVENT_TIMESTAMP]).tolist()
    labels = {t: frame[t].to_numpy() for t in tasks}
    return [
        {"user_id": int(u), "item_id": int(i), "event_timestamp": int(t), "surface": s,
         "action": int(a),
         "labels": {k: float(v[j]) for k, v in labels.items() if v[j] == v[j]}}
        for j, (u, i, t, s, a) in enumerate(zip(
            frame["user_id"].tolist(), frame["item_id"].tolist(), ts, frame["surface"].tolist(),
            frame["action"].tolist(), strict=True))
    ]  # fmt: skip


def rest_phase(port: int, frame: pd.DataFrame, tasks: list[str]) -> dict:
    """POST /v1/events in batches of REST_BATCH events on one keep-alive connection (bodies
    encoded before the clock starts: the server's parsing and validation are measured)."""
    rows = _json_events(frame, tasks)
    bodies = [json.dumps({"events": rows[s : s + REST_BATCH]}).encode()
              for s in range(0, len(rows), REST_BATCH)]  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    accepted = 0
    try:
        t0 = time.perf_counter()
        for body in bodies:
            conn.request("POST", "/v1/events", body=body,
                         headers={"Content-Type": "application/json"})  # fmt: skip
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"POST /v1/events: {r.status} {data[:300]!r}")
            accepted += json.loads(data)["accepted"]
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    return {"events": len(frame), "accepted": accepted, "batch": REST_BATCH,
            "seconds": round(seconds, 3), "events_per_s": round(len(frame) / seconds)}


def wait_http(port: int, worker: Worker, timeout_s: float = 180) -> None:
    """Until GET /healthz answers 200 (RuntimeError if the server exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.check()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise TimeoutError(f"{worker.name} did not answer within {timeout_s:.0f} s")


def _ms_stats(values_ms: np.ndarray) -> dict:
    a = np.asarray(values_ms, dtype=float)
    if len(a) == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": int(len(a)), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


def visibility_phase(
    ctx: ServiceContext, worker_ctx: ServiceContext, version: FMVersion, spec: DatasetSpec,
    users: list[int], items: np.ndarray, probes: int,
) -> dict:  # fmt: skip
    """`measure_visibility` with a histories consumer of its own (group `histories`, consumer
    `visibility`, on `worker_ctx`'s long-timeout client) beside the `consume histories`
    process: whichever of the two is waiting gets a probe's entry."""
    from store_bridge.streams.histories import HistoriesConsumer
    from store_bridge.streams.visibility import measure_visibility

    consumer = HistoriesConsumer(worker_ctx.events_stream, worker_ctx.histories,
                                 consumer="visibility")  # fmt: skip
    got = measure_visibility(ctx.events_stream, consumer, ctx.fm_tier, version, spec, users,
                             items, spec.surfaces[0], samples=probes)  # fmt: skip
    return {**_ms_stats(np.asarray(got.latencies_s) * 1000), "fm_version": version.version,
            "consumer_reconnects": got.consumer_reconnects}


def _feedback_frame(spec: DatasetSpec, pairs: list[tuple[int, int]], surface: str,
                    ts_us: int) -> pd.DataFrame:  # fmt: skip
    """Feedback events for (user, item) pairs on `surface` at `ts_us` (+1 µs each): a click
    (action 1, label 1 on the first of the surface's tasks, 0 on its others)."""
    from store_bridge.events.schema import EVENT_TIMESTAMP

    n = len(pairs)
    tasks = spec.surface_tasks.get(surface, [])
    frame = pd.DataFrame({
        "user_id": np.array([u for u, _ in pairs], dtype=np.int64),
        "item_id": np.array([i for _, i in pairs], dtype=np.int64),
        EVENT_TIMESTAMP: pd.to_datetime(ts_us + np.arange(n), unit="us", utc=True).astype(
            "datetime64[us, UTC]"),
        "surface": [surface] * n, "action": np.ones(n, dtype=np.int16),
    })  # fmt: skip
    for t in spec.all_tasks:
        value = np.nan if t not in tasks else (1.0 if t == tasks[0] else 0.0)
        frame[t] = np.full(n, value, dtype=np.float32)
    return frame


def data_to_trainer_phase(
    ctx: ServiceContext, version: FMVersion, spec: DatasetSpec, users: list[int],
    items: np.ndarray, feedback: int, workers: tuple[Worker, ...],
) -> dict:  # fmt: skip
    """Lookups (impressions logged by the service) -> the logging consumer caught up ->
    feedback for `feedback` of the impressions, ingested FEEDBACK_BATCH at a time every
    FEEDBACK_PACE_S -> the join's training rows; their data_to_trainer_us."""
    from api.services.events import ingest
    from api.services.lookup import lookup
    from fm.timefeatures import to_us
    from store_bridge.streams.impressions import read_training_rows

    surface = spec.surfaces[0]
    not_logged = 0
    for u in users:
        out = lookup(ctx, u, items.tolist(), fm_version=version.version, surface=surface)
        not_logged += out.stats.impressions_not_logged
    ctx.impression_buffer.flush()
    wait_caught_up(ctx.impressions_stream, ("logging",), time.perf_counter(), timeout_s=300,
                   workers=workers)  # fmt: skip
    pairs = [(u, int(i)) for u in users for i in items]
    step = max(1, len(pairs) // feedback)
    pairs = pairs[::step][:feedback]
    ids: set[str] = set()
    for start in range(0, len(pairs), FEEDBACK_BATCH):
        now = to_us(pd.Timestamp.now(tz="UTC").to_pydatetime())
        out = ingest(ctx, _feedback_frame(spec, pairs[start : start + FEEDBACK_BATCH], surface,
                                          now))  # fmt: skip
        ids.update(out.event_ids)
        time.sleep(FEEDBACK_PACE_S)
    deadline = time.monotonic() + 300
    while True:
        rows = read_training_rows(ctx.repo)
        mine = rows[rows["feedback_event_id"].isin(ids)] if len(rows) else rows
        if len(mine) >= len(ids):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the join wrote {len(mine)} of {len(ids)} feedback rows in 300 s")
        for w in workers:
            w.check()
        time.sleep(0.2)
    latency_ms = mine["data_to_trainer_us"].to_numpy(dtype=float) / 1000
    return {**_ms_stats(latency_ms), "impressions": len(users) * len(items),
            "impressions_not_logged": not_logged, "feedback_events": len(ids),
            "batch": FEEDBACK_BATCH}  # fmt: skip


# --- the run -------------------------------------------------------------------------------------


def _lags(ctx: ServiceContext) -> dict:
    return {s.name: {g.group: {"events": g.events, "oldest_unacked_s": round(g.oldest_unacked_s, 3)}
                     for g in s.lag()}
            for s in (ctx.events_stream, ctx.impressions_stream)}  # fmt: skip


def forget_project(client, project: str) -> int:
    """Delete every key whose name holds `project` (the bench's Feast projects are named
    `foundex_sbench_<random>`: its streams, histories, dedup and join keys, and Feast's rows,
    whose keys end with the project's name) -> keys deleted."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"*{project}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


def _redis(cfg: StreamBenchConfig, tmp: Path):
    """(url, embedded server or None): REDIS_URL, or a redis-server of the bench's own."""
    from store_bridge.redis_server import EmbeddedRedis

    if cfg.redis_url:
        return cfg.redis_url, None
    binary = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    server = EmbeddedRedis(tmp / "redis", binary=binary)
    return server.start(), server


def run(cfg: StreamBenchConfig, say: Callable[[str], None] = print) -> dict:
    """The whole bench (see the module docstring) -> the result dict; the table goes to `say`."""
    tmp = Path(tempfile.mkdtemp(prefix="foundex-bench-stream-"))
    workers: list[Worker] = []
    contexts: list[ServiceContext] = []
    embedded = None
    try:
        url, embedded = _redis(cfg, tmp)
        result = _run(cfg, url, tmp, workers, contexts, say)
    finally:
        finals = {w.name: w.stop() for w in workers}
        if contexts and embedded is None and not cfg.keep:  # someone else's Redis: tidy up
            forget_project(contexts[0].client, contexts[0].repo.project)
        for c in contexts:
            c.close()
        if embedded is not None:
            embedded.stop()
        if cfg.keep:
            say(f"kept {tmp} (repos, worker logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["workers"] = finals
    for line in format_table(result):
        say(line)
    return result


def _run(cfg: StreamBenchConfig, url: str, tmp: Path, workers: list[Worker],
         contexts: list[ServiceContext], say: Callable[[str], None]) -> dict:  # fmt: skip
    import torch

    from api.services.context import ServiceContext
    from api.settings import Settings
    from fm.timefeatures import to_us
    from store_bridge.events.schema import DatasetSpec

    repo = build_repo(tmp / "feature_repo", url, say)
    scratch = scratch_repo(tmp / "scratch_repo", repo)
    settings = Settings(repo=repo.path, redis_url=url)
    ctx = ServiceContext(settings, url, redis_timeout_s=10)  # the producer and the service
    watch = ServiceContext(settings, url, redis_timeout_s=10)  # lag samples, the probe consumer
    alone = ServiceContext(Settings(repo=scratch, redis_url=url), url, redis_timeout_s=10)
    contexts += [ctx, watch, alone]
    spec = DatasetSpec.load(repo.events_dir / "spec.json")
    env = {**os.environ, "REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    for name in ("FOUNDEX_ADMIN_TOKEN", "FOUNDEX_READ_TOKEN", "FOUNDEX_REPO"):
        env.pop(name, None)

    def start(name: str, *args: str, where: Path = repo.path) -> Worker:
        workers.append(Worker(name, [*args, "--repo", str(where)], env, tmp))
        return workers[-1]

    ctx.events_stream.ensure_groups()  # histories, offline: from the first event
    hist = start("histories", "consume", "histories", "--lag-every", "0")
    offl = start("offline", "consume", "offline", "--lag-every", "0")
    port = _free_port()
    server = start("serve", "serve", "--port", str(port), where=scratch) if cfg.rest_events else None
    wait_registered(watch.events_stream, "histories", hist)
    wait_registered(watch.events_stream, "offline", offl)
    if server is not None:
        wait_http(port, server)
    consumers = (hist, offl)
    result: dict = {"bench": "stream", "goal_events_per_s": GOAL_EVENTS_PER_S,
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                    "torch_threads": torch.get_num_threads()}  # fmt: skip

    now_us = to_us(pd.Timestamp.now(tz="UTC").to_pydatetime())
    frame = synthetic_events(spec, cfg.events, users=cfg.users, end_us=now_us - 10_000_000)
    say(f"ingest: {cfg.events:,} events through the ingest use-case, `consume histories` and "
        "`consume offline` running as processes")
    result["ingest"] = ingest_phase(ctx, frame, watch.events_stream, consumers)
    result["meets_goal"] = result["ingest"]["end_to_end_events_per_s"] >= GOAL_EVENTS_PER_S
    say("the producer alone (no consumer running), scratch streams: the ingest use-case, one "
        "XADD per event (pipelined)" + (", POST /v1/events through `foundex serve`"
                                        if server is not None else ""))  # fmt: skip
    result["producer_alone"] = producer_phase(alone, frame)
    result["naive_xadd"] = naive_phase(watch.client, alone.repo.project, frame)
    result["rest"] = None
    if server is not None:
        rest = synthetic_events(spec, cfg.rest_events, users=cfg.users, seed=1,
                                end_us=now_us - 5_000_000)  # fmt: skip
        result["rest"] = rest_phase(port, rest, spec.all_tasks)
        workers.remove(server)
        server.stop()
        _drop_stream(alone.events_stream)

    events = pd.read_parquet(repo.events_dir / "events.parquet", columns=["user_id", "item_id"])
    known_users = sorted(int(u) for u in events["user_id"].unique())
    known_items = np.unique(events["item_id"].to_numpy(np.int64))
    version = ctx.version("v1")
    say(f"visibility: {cfg.probes} probes (event appended -> a TAE of FM v1 reflects it)")
    result["visibility"] = visibility_phase(ctx, watch, version, spec, known_users[:10],
                                            known_items[:8], cfg.probes)  # fmt: skip

    logging_w = start("logging", "consume", "logging", "--lag-every", "0")
    join_w = start("join", "consume", "join", "--lag-every", "0")
    wait_registered(watch.impressions_stream, "logging", logging_w)
    wait_registered(watch.events_stream, "join", join_w)
    n_users = max(1, min(len(known_users), -(-cfg.feedback // LOOKUP_ITEMS) * 2))
    say(f"data-to-trainer: {n_users} lookups x {LOOKUP_ITEMS} items served, feedback for "
        f"{cfg.feedback} of them; `consume logging` and `consume join` running as processes")
    result["data_to_trainer"] = data_to_trainer_phase(
        ctx, version, spec, known_users[:n_users], known_items[:LOOKUP_ITEMS], cfg.feedback,
        (*consumers, logging_w, join_w),
    )  # fmt: skip
    result["lag_end"] = _lags(watch)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(r: dict) -> list[str]:
    """The result as table lines (events/s per path, then latencies and lag)."""
    ing, alone = r["ingest"], r["producer_alone"]
    rows = [f"{'path':<50}{'events':>10}{'seconds':>9}{'events/s':>10}"]

    def row(name: str, events: int, seconds: float, rate: float, note: str = "") -> None:
        rows.append(f"{name:<50}{events:>10,}{seconds:>9.2f}{rate:>10,.0f}{note}")

    rows.append("live: consumers running as `foundex consume` processes")
    row(f"  ingest use-case ({ing['call_events']} events per entry)", ing["events"],
        ing["seconds"], ing["events_per_s"])
    for g, k in ing["keep_up"].items():
        row(f"  {g} caught up (from ingest start)", ing["events"], k["caught_up_s"],
            k["events_per_s"])
    goal = "meets" if r["meets_goal"] else "misses"
    rows.append(f"{'  end to end: ingested and both caught up':<69}"
                f"{ing['end_to_end_events_per_s']:>10,}  ({goal} the goal of "
                f">= {r['goal_events_per_s']:,})")
    rows.append("the producer alone (no consumer running), scratch streams")
    row(f"  ingest use-case, record batches of {alone['call_events']}", alone["events"],
        alone["seconds"], alone["events_per_s"],
        f"  {alone['redis_bytes_per_event']:.0f} B/event in the stream")
    nv = r["naive_xadd"]
    row("  naive: one XADD per event (pipelined)", nv["events"], nv["seconds"],
        nv["events_per_s"], f"  {nv['redis_bytes_per_event']:.0f} B/event in the stream")
    if r["rest"]:
        rs = r["rest"]
        row(f"  REST POST /v1/events, {rs['batch']} per request", rs["events"], rs["seconds"],
            rs["events_per_s"])
    for g, m in ing["max_lag"].items():
        rows.append(f"max lag while ingesting, {g}: {m['events']:,} events, oldest "
                    f"unacknowledged {m['oldest_unacked_s']:.2f}s ({ing['lag_samples']} samples)")
    v, d = r["visibility"], r["data_to_trainer"]
    rows.append(f"event-to-TAE visibility (FM {v['fm_version']}, {v['n']} probes): "
                f"p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, max {v['max_ms']:.1f} ms")
    rows.append(f"data-to-trainer ({d['n']} feedback rows, ingested {d['batch']} at a time): "
                f"p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms")
    behind = {f"{s}/{g}": x["events"] for s, gs in r["lag_end"].items() for g, x in gs.items()}
    rows.append("lag at the end: " + ", ".join(f"{k} {v:,}" for k, v in behind.items()))
    rows.append(f"(load average at start {r['loadavg_1m']}, torch threads {r['torch_threads']})")
    return rows
