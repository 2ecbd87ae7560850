"""`foundex log` at its edges: bad impressions get one `error:` line (exit 2) naming the column
and the first bad row, before torch, Feast or Redis start; a Redis that does not answer, or
dies mid-run, ends in one line and a rerun resumes; progress bars only on a terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, start_redis
from test_store_logging import assert_logged_exactly_once, impressions_for, make_fm_repo

from store_bridge.events.schema import DatasetSpec
from store_bridge.logging_tier import prepare_impressions
from store_bridge.online import RedisEmbeddingStore
from store_bridge.redis_server import redis_client

T = pd.to_datetime(["2026-01-05T01:00Z", "2026-01-05T02:00Z", "2026-01-05T03:00Z"])
# Prints which heavy modules were loaded when the command ended.
SCRIPT = (
    "import atexit, sys\n"
    "atexit.register(lambda: print(sorted(m for m in ('torch', 'feast') if m in sys.modules)))\n"
    "from api.cli import app\n"
    "app(sys.argv[1:], prog_name='foundex')\n"
)


def _rows(**cols) -> pd.DataFrame:
    base = {"user_id": [1, 2, 3], "item_id": [10, 11, 12], "event_timestamp": T,
            "surface": ["feed", "feed", "search"]}
    return pd.DataFrame({**base, **cols})


@pytest.fixture(scope="module")
def spec_repo(tmp_path_factory) -> Path:
    """A repo with a dataset spec (surfaces feed, search) and no FM: every check of the rows
    happens before an FM or Redis would be needed."""
    from conftest import copy_feature_repo

    path = copy_feature_repo(tmp_path_factory.mktemp("log_inputs") / "repo")
    events = path / "data" / "events"
    events.mkdir(parents=True)
    DatasetSpec(name="t", surfaces=["feed", "search"], main_tasks=["click"],
                surface_tasks={"feed": ["click"], "search": ["click"]}).save(events / "spec.json")
    return path


def _foundex(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FOUNDEX_REPO")}
    return {**env, **extra}


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_rows(event_timestamp=T.astype("int64")),
         "event_timestamp holds numbers (int64), not timestamps; epoch numbers are refused "
         "because their unit is ambiguous: convert them, e.g. pd.to_datetime(col, unit='s', "
         "utc=True)"),
        (_rows(event_timestamp=["2026-01-05T01:00:00", "2300-01-01T00:00:00",
                                "2026-01-05T01:00:00"]),
         "event_timestamp holds a time outside the supported range 1970-01-01 .. 2262-04-10 "
         "UTC (row 1: '2300-01-01T00:00:00')"),
        (_rows(event_timestamp=pd.to_datetime(["2026-01-05T01:00Z", "1969-12-31T23:00Z",
                                               "2026-01-05T01:00Z"])),
         "event_timestamp 1969-12-31T23:00:00+00:00 (row 1) is outside the supported range "
         "1970-01-01 .. 2262-04-10 UTC (1 of 3 rows)"),
        (_rows(item_id=[10.0, np.nan, 12.0]), "item_id must hold whole numbers, got nan (row 1)"),
        (_rows(user_id=["1", "2", "3"]), "user_id must hold integer ids, got object"),
        (_rows(surface=["feed", "nosuch", "other"]),
         "surface values ['nosuch', 'other'] are not ones the FM versions know (first: row 1; "
         "known: ['feed', 'search'])"),
        (_rows(surface=["feed", None, "feed"]), "surface is missing on 1 rows (first: row 1)"),
        (_rows().drop(columns=["surface"]),
         "impressions lack columns ['surface'] (have: ['user_id', 'item_id', "
         "'event_timestamp'])"),
    ],
    ids=["int-epoch", "year-2300", "before-1970", "nan-item", "text-user", "unknown-surface",
         "missing-surface", "no-surface-column"],
)
def test_bad_impressions_fail_in_one_line_before_torch_feast_or_redis(
    spec_repo, tmp_path, frame, message
):
    path = tmp_path / "imp.parquet"
    frame.to_parquet(path)
    out = _foundex("log", "--impressions", str(path), "--repo", str(spec_repo), env=_env())
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"error: {path}: {message}"
    assert out.stdout.strip() == "[]"  # neither torch nor feast loaded
    assert not (spec_repo / "data" / "redis").exists()  # no embedded Redis started


def test_bad_files_fail_in_one_line(spec_repo, tmp_path):
    missing = tmp_path / "missing.parquet"
    text = tmp_path / "text.parquet"
    text.write_text("user_id,item_id\n1,2\n")
    cases = [
        (missing, f"error: impressions file not found: {missing}"),
        (tmp_path, f"error: --impressions {tmp_path} is not a file"),
        (text, f"error: {text}: not a readable parquet file (ArrowInvalid)"),
    ]
    for path, message in cases:
        out = _foundex("log", "--impressions", str(path), "--repo", str(spec_repo), env=_env())
        assert (out.returncode, out.stderr.strip(), out.stdout.strip()) == (2, message, "[]")


def test_redis_that_does_not_answer_is_one_line_before_any_fm(spec_repo, tmp_path):
    path = tmp_path / "imp.parquet"
    _rows(event_timestamp=T.tz_localize(None)).to_parquet(path)
    out = _foundex("log", "--impressions", str(path), "--repo", str(spec_repo),
                   env=_env(REDIS_URL="redis://:hush@127.0.0.1:1/0"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "note: event_timestamp has no time zone; its times are taken as UTC",
        "error: redis at redis://:***@127.0.0.1:1/0 does not answer: Error 111 connecting to "
        "127.0.0.1:1. Connection refused.",
    ]
    assert out.stdout.strip() == "[]"


def test_help_names_the_columns_and_no_hour_requirement():
    out = subprocess.run([sys.executable, "-m", "api.cli", "log", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env=_env(COLUMNS="300", TERM="dumb", NO_COLOR="1"))
    text = " ".join(out.stdout.replace("│", " ").split())
    assert "surface (one the FM versions know); an hour column, if present, is ignored" in text
    assert "surface, hour" not in text


def test_prepare_keeps_times_in_utc_and_drops_hour():
    notes: list[str] = []
    frame = _rows(event_timestamp=["2026-01-05T03:00:00", "2026-01-05T01:00:00+02:00",
                                   "2026-01-05T02:00:00"], hour=[7, 7, 7])
    got = prepare_impressions(frame, ["feed", "search"], on_note=notes.append)
    assert list(got.columns) == ["user_id", "item_id", "event_timestamp", "surface"]
    assert list(got["event_timestamp"].astype(str)) == [
        "2026-01-04 23:00:00+00:00",
        "2026-01-05 02:00:00+00:00", "2026-01-05 03:00:00+00:00"]
    assert list(got["user_id"]) == [2, 3, 1]
    assert notes == ["event_timestamp: 2 of 3 times have no offset; taken as UTC"]


def test_redis_dying_mid_run_is_one_line_and_a_rerun_resumes(tmp_path):
    repo, events = make_fm_repo(tmp_path / "repo", "log_dies")
    imp = impressions_for(events, 1000)
    path = tmp_path / "imp.parquet"
    imp.to_parquet(path, index=False)
    server = start_redis(tmp_path / "redis")
    try:
        env = _env(REDIS_URL=server.url)
        cmd = [sys.executable, "-m", "api.cli", "log", "--impressions", str(path),
               "--repo", str(repo.path), "--chunk-rows", "20"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while len(list(repo.tae_dir("v1").glob("*/part-*.parquet"))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the log job wrote nothing in time"
            time.sleep(0.01)
        os.kill(server.proc.pid, signal.SIGKILL)  # the server we started, by its pid
        server.proc.wait(timeout=30)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: redis at {server.url} stopped answering (redis: "), err
        assert lines[0].endswith("nothing written is lost: run the same command again to resume")
        assert "\r" not in err  # no progress bars: stderr is not a terminal
        done = len(list(repo.tae_dir("v1").glob("*/part-*.parquet")))

        server = start_redis(tmp_path / "redis2")
        env = _env(REDIS_URL=server.url)
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        v1 = next(line for line in rerun.stdout.splitlines() if line.startswith("v1:"))
        assert done > 0 and not v1.endswith(" 0 chunks done by an earlier run"), v1
        assert rerun.stderr == ""  # no bars, no notes: the times have a zone
        # Offline rows are exactly once; the online rows of chunks done before the kill went
        # to the first server (AOF off), so only versions fully logged on this one are checked.
        store = RedisEmbeddingStore(redis_client(server.url), "log_dies")
        prepared = prepare_impressions(imp)
        v2 = repo.load_manifest().active()[1]
        assert_logged_exactly_once(repo, store, v2.version, v2.dim, prepared)
    finally:
        server.stop()
