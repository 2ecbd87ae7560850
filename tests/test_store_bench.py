"""`foundex bench store` at a small size: it runs end to end, the rows it compares are
identical, and the last line is one JSON object with every figure and ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_store_small(redis_url, feature_repo):
    env = dict(os.environ, REDIS_URL=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "bench", "store", "--repo", str(feature_repo),
         "--rows", "5000", "--candidates", "100", "--dim", "16", "--users", "10", "--repeats", "3",
         "--batch-repeats", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "online read 100 x 16-d" in out.stdout and "training set 5,000 rows" in out.stdout
    assert result["training"]["identical_rows"] is True
    assert result["training"]["runs"] == result["logging"]["runs"] == 2
    assert 0 < result["training"]["rows_with_embedding"] < 5000
    assert set(result["ratios"]) == set(result["targets_met"]) == {
        "online_speedup_vs_feast", "online_slowdown_vs_raw", "training_speedup_vs_feast",
        "logging_speedup_vs_feast",
    }
    for section in ("online", "training", "logging"):
        assert all(v > 0 for v in result[section].values() if isinstance(v, float))
    # The scratch project's rows are gone from Redis afterwards.
    from store_bridge.redis_server import redis_client

    assert not list(redis_client(redis_url).scan_iter(match=b"*bench_*", count=1000))
