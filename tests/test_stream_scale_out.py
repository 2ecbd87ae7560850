"""Scale-out of a consumer role: two `foundex consume histories` processes in one consumer
group split the stream between them, and together leave the same histories as one would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from api.services.events import ingest
from tests.conftest import ROOT, wait_for
from tests.test_stream_ingest import canonical_events, context, live_repo


def histories_lag(ctx) -> int:
    return next(g.events for g in ctx.events_stream.lag() if g.group == "histories")


def test_two_histories_consumers_share_the_group(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo")
    ctx = context(repo, redis_url, stream_batch_events=20)
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("FOUNDEX_REPO", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "api.cli", "consume", "histories", "--repo", str(repo),
             "--consumer", name, "--lag-every", "3600"],  # one report: the last
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in ("worker-a", "worker-b")
    ]
    lines: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
               for p, out in zip(procs, lines, strict=True)]
    for r in readers:
        r.start()
    try:
        wait_for(lambda: all(any("started" in x for x in out) for out in lines),
                 "both consumers to start", timeout=120)
        events = canonical_events(6000, seed=11, users=50)
        total = 0
        for chunk in np.array_split(np.arange(len(events)), 60):  # entries arrive over time
            total += ingest(ctx, events.iloc[chunk]).accepted
            time.sleep(0.02)
        wait_for(lambda: histories_lag(ctx) == 0, "the histories group to catch up",
                 timeout=240)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        for r in readers:
            r.join(timeout=10)
    outs = ["".join(out) for out in lines]
    assert [p.returncode for p in procs] == [0, 0], outs
    handled = [sum(int(n.replace(",", "")) for n in re.findall(r"([\d,]+) events handled", o))
               for o in outs]
    assert sum(handled) == total == len(events), (handled, outs)
    assert min(handled) > 0, f"one consumer did all the work: {handled}"

    for user, mine in events.groupby("user_id"):
        h = ctx.histories.read(int(user))
        want = sorted(zip(mine["event_timestamp"].to_numpy(dtype="datetime64[us]").view(np.int64),
                          mine["item_id"], strict=True))  # fmt: skip
        assert sorted(zip(h.ts_us.tolist(), h.item.tolist(), strict=True)) == want
