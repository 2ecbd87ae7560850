"""`foundex bench api`: our REST lookup vs Feast's own feature server, then a load run.

Everything runs on a repo of its own, built here (no demo needed): a temp copy of
feature_repo/ with one FM version of dim 128 in the manifest, `feast apply`, and random TAEs
written in Feast's Redis layout. Then, in one run:

1. the same 500 x 128-d lookup, interleaved, through `foundex serve` (JSON and binary) and
   `feast serve` (/get-online-features), plus a raw in-process Redis pipeline read;
2. a loopback load run at a fixed request rate (open loop: requests leave on schedule, and
   latency counts from the scheduled time, so a stalled server cannot hide its queue);
3. with the embedded Redis (no REDIS_URL), the store is stopped and the time to a 503 measured.

Servers run as subprocesses (their own interpreters, as in production) and are always stopped.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VERSION = "v1"


@dataclass
class BenchConfig:
    items: int = 500
    dim: int = 128
    users: int = 20
    repeats: int = 100
    rate: float = 200.0
    duration: float = 60.0
    load_items: int = 100
    load_format: str = "json"  # json | f32
    redis_url: str | None = None
    keep: bool = False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_repo(path: Path, redis_url: str, cfg: BenchConfig) -> None:
    """A repo with one 128-d version whose TAEs for (users x items) are in Redis."""
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import redis_client
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply, now_iso

    path.mkdir(parents=True, exist_ok=True)
    for name in ["feature_store.yaml", "definitions.py", ".feastignore"]:
        shutil.copy(ROOT / "feature_repo" / name, path / name)
    yaml_path = path / "feature_store.yaml"
    text = yaml_path.read_text().replace("project: foundex", "project: foundex_bench")
    yaml_path.write_text(text)
    repo = FeatureRepo(path)
    entry = FMVersion(
        version=VERSION, dim=cfg.dim, checkpoint=f"checkpoints/{VERSION}.pt", digest="0" * 64,
        training_window=("2024-01-01T00:00:00+00:00", "2024-01-08T00:00:00+00:00"),
        ttl_seconds=3650 * 86400, created_at=now_iso(), description="bench: random TAEs",
    )  # fmt: skip
    repo.save_manifest(Manifest(versions={VERSION: entry}))
    feast_apply(repo, redis_url)
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, cfg.users + 1, dtype=np.int64), cfg.items)
    items = np.tile(np.arange(1, cfg.items + 1, dtype=np.int64), cfg.users)
    tae = rng.standard_normal((len(users), cfg.dim)).astype(np.float32)
    ts = np.full(len(users), int(time.time() * 1e6), dtype=np.int64)
    store = RedisEmbeddingStore(redis_client(redis_url, timeout=30), repo.project)
    store.write(VERSION, users, items, ts, tae)


class Proc:
    """A server subprocess in its own process group, stopped on exit."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], health: str) -> None:
        self.health = health
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{tail}")
            try:
                if httpx.get(self.health, timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: {self.health}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "median_ms": round(float(np.median(a)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "n": len(a),
    }


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def compare(ours: str, feast: str, redis_url: str, project: str, cfg: BenchConfig) -> dict:
    """The same lookup through every path, interleaved so they share the machine's mood."""
    from store_bridge.feast_layout import entity_keys, feature_field
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import redis_client
    from store_bridge.repo import view_name

    items = list(range(1, cfg.items + 1))
    body = {"user_id": 1, "item_ids": items, "fm_version": VERSION}
    fbody = {
        "features": [f"{view_name(VERSION)}:embedding"],
        "entities": {"user_id": [1] * cfg.items, "item_id": items},
    }
    store = RedisEmbeddingStore(redis_client(redis_url, timeout=5), project)
    arr = np.asarray(items, dtype=np.int64)
    keys = entity_keys(project, {"user_id": np.ones(len(arr), np.int64), "item_id": arr})
    field = feature_field(view_name(VERSION), "embedding")
    # A lean keep-alive client (stdlib http.client), the same for every path: it adds little
    # of its own to what is measured, unlike a full-featured client (~2 ms on a 700 KB body).
    o, f = _Conn(ours), _Conn(feast)
    try:
        json_body = json.dumps(body).encode()
        bin_body = json.dumps({**body, "format": "f32"}).encode()
        feast_body = json.dumps(fbody).encode()

        def ours_json() -> None:
            o.post("/v1/embeddings/lookup", json_body)

        def ours_bin() -> None:
            o.post("/v1/embeddings/lookup", bin_body)

        def feast_serve() -> None:
            f.post("/get-online-features", feast_body)

        def raw_redis() -> None:  # the floor: HGETs in one pipeline, no decoding
            with store.client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hget(k, field)
                pipe.execute()

        def store_read() -> None:  # the service's own read, without HTTP
            store.read(VERSION, cfg.dim, 1, arr)

        # Same values on both servers (and nothing missing) before timing anything.
        mine = np.asarray(json.loads(o.post("/v1/embeddings/lookup", json_body))["embeddings"])
        res = json.loads(f.post("/get-online-features", feast_body))
        col = res["metadata"]["feature_names"].index("embedding")
        theirs = np.asarray(res["results"][col]["values"], dtype=np.float64)
        if mine.shape != (cfg.items, cfg.dim) or not np.allclose(mine, theirs, atol=1e-6):
            raise RuntimeError("foundex and feast serve disagree on the benchmark rows")

        paths = {"foundex REST json": ours_json, "foundex REST f32": ours_bin,
                 "feast serve": feast_serve, "raw redis pipeline": raw_redis,
                 "store read (in-process)": store_read}
        for fn in paths.values():
            for _ in range(5):
                fn()  # warm-up: connections, caches, first-call imports
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(cfg.repeats):
            for name, fn in paths.items():
                times[name].append(_timed(fn))
    finally:
        o.close()
        f.close()
    return {k: _stats(v) for k, v in times.items()}


class _Conn:
    """One keep-alive HTTP/1.1 connection; POST JSON, return the body, raise on non-200."""

    def __init__(self, base: str) -> None:
        parsed = urlparse(base)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)

    def post(self, path: str, body: bytes) -> bytes:
        self.conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {data[:200]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


async def _exchange(reader, writer, request: bytes) -> int:
    """One HTTP/1.1 request on a keep-alive connection; returns the status, body drained."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def _load_requests(cfg: BenchConfig) -> list[bytes]:
    """A pool of 64 distinct raw lookup requests (users, candidate sets), built up front."""
    rng = np.random.default_rng(1)
    requests = []
    for k in range(64):
        body = {"user_id": k % cfg.users + 1, "fm_version": VERSION,
                "item_ids": rng.choice(np.arange(1, cfg.items + 1), cfg.load_items,
                                       replace=False).tolist()}
        if cfg.load_format != "json":
            body["format"] = cfg.load_format
        raw = json.dumps(body).encode()
        requests.append(
            b"POST /v1/embeddings/lookup HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw
        )
    return requests


async def _load(url: str, cfg: BenchConfig) -> dict:
    """Open-loop load: request k is due at t0 + k/rate whatever happened before it.

    The client is a handful of raw keep-alive connections (no HTTP library), so the load
    generator itself stays light next to the server on a small machine; latency counts from
    the due time, so client or server queueing shows up in it.
    """
    parsed = urlparse(url)
    n = int(cfg.rate * cfg.duration)
    requests = _load_requests(cfg)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue: asyncio.Queue = asyncio.Queue()

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def worker() -> None:
        conn = None
        while (job := await queue.get()) is not None:
            k, due = job
            try:
                if conn is None:
                    conn = await asyncio.open_connection(parsed.hostname, parsed.port)
                status = await asyncio.wait_for(_exchange(*conn, requests[k % 64]), 10)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError,
                    IndexError) as e:
                error(type(e).__name__)
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            if status == 200:
                latencies.append((time.perf_counter() - due) * 1000)
            else:
                error(str(status))
        if conn is not None:
            conn[1].close()

    workers = [asyncio.create_task(worker()) for _ in range(32)]
    t0 = time.perf_counter() + 0.2
    for k in range(n):
        due = t0 + k / cfg.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((k, due))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return _load_summary(n, time.perf_counter() - t0, latencies, errors)


def _load_summary(n: int, wall: float, latencies: list[float], errors: dict[str, int]) -> dict:
    out = {"requests": n, "ok": len(latencies), "errors": sum(errors.values()),
           "error_kinds": errors, "achieved_rps": round(n / wall, 1)}
    if latencies:
        a = np.asarray(latencies)
        out.update(p50_ms=round(float(np.percentile(a, 50)), 3),
                   p99_ms=round(float(np.percentile(a, 99)), 3),
                   max_ms=round(float(a.max()), 3))
    return out


def fault_latency(url: str, server, n: int = 20) -> dict:
    """Stop the (embedded) Redis under the running service; time the 503s."""
    body = {"user_id": 1, "item_ids": list(range(1, 501)), "fm_version": VERSION}
    server.stop()
    ms, codes = [], []
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/embeddings/lookup", json=body)
            ms.append((time.perf_counter() - t0) * 1000)
            codes.append(r.status_code)
        ready = c.get("/readyz").status_code
    return {"status_codes": sorted(set(codes)), "readyz": ready, **_stats(ms),
            "max_ms": round(max(ms), 3)}


def run(cfg: BenchConfig, say: Callable[[str], None] = print) -> dict:
    from store_bridge.redis_server import EmbeddedRedis, feast_connection_string
    from store_bridge.repo import FeatureRepo, feast_env

    tmp = Path(tempfile.mkdtemp(prefix="foundex-bench-"))
    repo_path = tmp / "feature_repo"
    embedded = None
    procs: list[Proc] = []
    try:
        if cfg.redis_url:
            url = cfg.redis_url
        else:
            binary = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
            embedded = EmbeddedRedis(tmp / "redis", binary=binary)
            url = embedded.start()
        say(f"building a {cfg.dim}-d repo in {repo_path} ({cfg.users} users x {cfg.items} items)")
        build_repo(repo_path, url, cfg)
        project = FeatureRepo(repo_path).project
        ours_port, feast_port = _free_port(), _free_port()
        env = {**feast_env(url), "REDIS_URL": url, "FOUNDEX_REPO": str(repo_path)}
        env.pop("FOUNDEX_ADMIN_TOKEN", None)
        env.pop("FOUNDEX_READ_TOKEN", None)
        env["FOUNDEX_FEAST_REDIS"] = feast_connection_string(url)
        ours = Proc([sys.executable, "-m", "api.cli", "serve", "--repo", str(repo_path),
                     "--port", str(ours_port)], ROOT, env, f"http://127.0.0.1:{ours_port}/readyz")
        procs.append(ours)
        feast_bin = Path(sys.executable).with_name("feast")
        feast = Proc([str(feast_bin) if feast_bin.exists() else "feast", "serve", "-p",
                      str(feast_port), "--no-access-log"], repo_path, env,
                     f"http://127.0.0.1:{feast_port}/health")
        procs.append(feast)
        ours.wait_ready()
        feast.wait_ready()
        ours_url, feast_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{feast_port}"

        say(f"lookup {cfg.items} x {cfg.dim}-d, {cfg.repeats} rounds, interleaved; REST paths "
            "over loopback with one keep-alive http.client connection each, raw paths in-process")
        lookups = compare(ours_url, feast_url, url, project, cfg)
        feast.stop()  # the load run gets the machine to itself
        ratio = lookups["feast serve"]["median_ms"] / lookups["foundex REST json"]["median_ms"]
        say(f"load: {cfg.rate:g} req/s for {cfg.duration:g}s, {cfg.load_items} x {cfg.dim}-d "
            f"({cfg.load_format}) per request")
        load = asyncio.run(_load(ours_url, cfg))
        fault = fault_latency(ours_url, embedded) if embedded is not None else None
    finally:
        for p in procs:
            p.stop()
        if embedded is not None:
            embedded.stop()
        if not cfg.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    # What REST adds over the service's own read (HTTP, validation, encoding), per format.
    read_ms = lookups["store read (in-process)"]["median_ms"]
    overhead = {fmt: round(lookups[f"foundex REST {fmt}"]["median_ms"] - read_ms, 3)
                for fmt in ("json", "f32")}
    rows = [f"{'path':<26}{'median ms':>11}{'p99 ms':>10}{'n':>6}"]
    for name, s in lookups.items():
        rows.append(f"{name:<26}{s['median_ms']:>11.2f}{s['p99_ms']:>10.2f}{s['n']:>6}")
    for fmt, ms in overhead.items():
        rows.append(f"{'REST ' + fmt + ' - store read':<26}{ms:>11.2f}"
                    + ("  (target <= 1.5 ms)" if fmt == "json" else ""))
    rows.append(f"feast serve / foundex REST json (median): {ratio:.1f}x "
                f"({'meets' if ratio >= 10 else 'misses'} the >= 10x target)")
    rows.append(f"load: {load['requests']} requests at {cfg.rate:g}/s -> achieved "
                f"{load['achieved_rps']}/s, errors {load['errors']}, "
                f"p50 {load.get('p50_ms', float('nan')):.2f} ms, "
                f"p99 {load.get('p99_ms', float('nan')):.2f} ms, "
                f"max {load.get('max_ms', float('nan')):.2f} ms")
    if fault:
        rows.append(f"redis stopped: statuses {fault['status_codes']}, readyz {fault['readyz']}, "
                    f"503 latency median {fault['median_ms']:.2f} ms, max {fault['max_ms']:.2f} ms")
    for r in rows:
        say(r)
    return {
        "bench": "api",
        "items": cfg.items,
        "dim": cfg.dim,
        "lookup": lookups,
        "speedup_vs_feast_serve": round(ratio, 2),
        "rest_overhead_ms": overhead,
        "load": {"rate": cfg.rate, "duration_s": cfg.duration, "items": cfg.load_items,
                 "format": cfg.load_format, **load},
        "redis_down": fault,
    }
