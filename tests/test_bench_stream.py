"""`foundex bench stream` end to end at a tiny size, as a real command on a real Redis: the
consumers and the server it starts are real processes; its last line is one JSON object with
every figure the table shows. (Speed is reported, never asserted.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis

from tests.conftest import ROOT


def test_bench_stream_prints_a_table_then_one_json_line(redis_url):
    env = dict(os.environ, REDIS_URL=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "bench", "stream", "--events", "3000", "--probes", "3",
         "--rest-events", "1000", "--feedback", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "stream" and result["goal_events_per_s"] == 20_000
    ing = result["ingest"]
    assert ing["events"] == ing["appended"] == 3000  # every event new: none lost, none deduped
    assert set(ing["keep_up"]) == set(ing["max_lag"]) == {"histories", "offline"}
    assert all(k["caught_up_s"] >= ing["seconds"] > 0 for k in ing["keep_up"].values())
    assert ing["end_to_end_events_per_s"] <= ing["events_per_s"]
    assert result["meets_goal"] == (ing["end_to_end_events_per_s"] >= 20_000)
    for peer in ("producer_alone", "naive_xadd"):
        assert result[peer]["events"] == 3000 and result[peer]["redis_bytes_per_event"] > 0
    assert result["rest"]["events"] == result["rest"]["accepted"] == 1000
    vis, d2t = result["visibility"], result["data_to_trainer"]
    assert vis["n"] == 3 and vis["consumer_reconnects"] == 0 and vis["p50_ms"] <= vis["p99_ms"]
    assert d2t["n"] == d2t["feedback_events"] == 10 and d2t["impressions_not_logged"] == 0
    assert 0 < d2t["p50_ms"] <= d2t["p99_ms"]
    # every consumer caught up at the end, and every process it started reported and stopped
    assert all(g["events"] == 0 for groups in result["lag_end"].values() for g in groups.values())
    assert set(result["lag_end"]["events"]) == {"histories", "offline", "join"}
    assert set(result["workers"]) == {"histories", "offline", "logging", "join"}
    assert all(line.startswith(f"consume {role}:") for role, line in result["workers"].items())
    # on a Redis of someone else's (REDIS_URL) it leaves none of its keys behind
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match="*foundex_sbench_*")) == []
    client.close()
    table = "\n".join(lines[:-1])
    for needle in ("ingest use-case", "naive: one XADD per event", "REST POST /v1/events",
                   "event-to-TAE visibility", "data-to-trainer", "max lag while ingesting"):
        assert needle in table, needle
