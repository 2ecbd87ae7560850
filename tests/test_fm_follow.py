"""`foundex fm train --follow`: continuous training on the live event stream, SIGKILLed and
resumed with no entry trained twice and none skipped, the weights of an uninterrupted run,
and weight-sync updates a reader follows to the trainer's synced state.

Each repo is a tiny one of its own (a Feast project of its own: its own stream, histories
and sync keys): a toy FM trained before a cut-off and put in the manifest as v1 (no Feast
apply: the follower reads the manifest only), its earlier events backfilled into the online
histories, the later ones ingested into the events stream by the real ingestion path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from api.services.context import ServiceContext
from api.services.events import ingest
from api.services.freshness import FollowOptions, follow
from api.settings import Settings
from fm import FMConfig
from fm.checkpoint import checkpoint_digest, load_checkpoint
from fm.sync import SyncedState, state_digest, tae_state
from fm.testing import AUX_TASKS, MAIN_TASKS, SURFACES, toy_config_kwargs, toy_events
from fm.train import latest_checkpoint, train_streaming
from store_bridge.events.schema import DatasetSpec
from store_bridge.fm_sync import SyncReader
from store_bridge.repo import FeatureRepo, FMVersion, Manifest, now_iso
from store_bridge.streams.fm_follow import follow_dir, trainer_group

N_ITEMS = 40
ENTRY_EVENTS = 40  # one stream entry = 10 toy requests of 4 candidates
BATCH_REQUESTS = 16  # so one step = two entries
PHASE1, PHASE2 = 12, 11  # entries: 6 steps, then 5 steps + a one-entry tail
OPTS = {"checkpoint_every": 4, "sync_every": 1, "snapshot_every": 3, "sync_fraction": 0.3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(events before the cut-off, stream events, the v1 checkpoint file)."""
    events = toy_events(n_users=6, n_items=N_ITEMS, n_requests=330, n_candidates=4, seed=3)
    # ids of their own: a request may show one item twice, which content ids would merge
    events["event_id"] = [f"e{i}" for i in range(len(events))]
    cut = 100 * 4  # the first 100 requests train v1
    before, after = events.iloc[:cut], events.iloc[cut:].reset_index(drop=True)
    assert len(after) == (PHASE1 + PHASE2) * ENTRY_EVENTS
    config = FMConfig.small(**toy_config_kwargs(N_ITEMS), d_model=16, n_layers=1, n_heads=2,
                            max_history=16, batch_requests=BATCH_REQUESTS)  # fmt: skip
    folder = tmp_path_factory.mktemp("v1")
    res = train_streaming(before.drop(columns="event_id"), config, checkpoint_dir=folder,
                          progress=False)
    return before, after, res.checkpoints[-1]


def make_repo(root: Path, redis_url: str, world) -> tuple[FeatureRepo, ServiceContext]:
    before, after, ckpt = world
    (root / "data" / "checkpoints").mkdir(parents=True)
    (root / "data" / "events").mkdir(parents=True)
    (root / "feature_store.yaml").write_text(f"project: fol_{uuid.uuid4().hex[:10]}\n")
    repo = FeatureRepo(root)
    DatasetSpec(
        name="toy", surfaces=list(SURFACES), main_tasks=list(MAIN_TASKS),
        surface_tasks={s: [*MAIN_TASKS, *AUX_TASKS[s]] for s in SURFACES}, n_actions=4,
    ).save(repo.events_dir / "spec.json")  # fmt: skip
    target = repo.checkpoints_dir / "v1.pt"
    target.write_bytes(Path(ckpt).read_bytes())
    window_end = after["event_timestamp"].iloc[0].isoformat()
    repo.save_manifest(Manifest(versions={"v1": FMVersion(
        version="v1", dim=16, checkpoint="checkpoints/v1.pt", digest=checkpoint_digest(target),
        training_window=(before["event_timestamp"].iloc[0].isoformat(), window_end),
        created_at=now_iso(),
    )}))  # fmt: skip
    settings = Settings(repo=root, redis_url=redis_url, stream_batch_events=ENTRY_EVENTS)
    ctx = ServiceContext(settings, redis_url, redis_timeout_s=10)
    assert ctx.histories.backfill(before) == len(before)
    return repo, ctx


def stream_ids(ctx: ServiceContext) -> list[str]:
    rows = ctx.events_stream.client.xrange(ctx.events_stream.key)
    return [(r[0].decode() if isinstance(r[0], bytes) else r[0]) for r in rows]


def put(ctx: ServiceContext, events: pd.DataFrame) -> None:
    res = ingest(ctx, events)
    assert not res.rejected and res.new == len(events)


def cli(repo: FeatureRepo, redis_url: str, *args: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("foundex")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from api.cli import app; app()"]
    env = {**os.environ, "FOUNDEX_REPO": str(repo.path), "REDIS_URL": redis_url}
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in OPTS.items()]
    return subprocess.Popen([*cmd, "fm", "train", "--follow", "v1", *opts, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def until_step(reader: SyncReader, proc: subprocess.Popen, step: int, late: str) -> None:
    """Poll (for up to 90 s) until the follower's published syncs reach `step`, or it exits."""
    deadline = time.monotonic() + 90
    while (reader.latest() is None or reader.latest().step < step) and proc.poll() is None:
        assert time.monotonic() < deadline, late
        time.sleep(0.05)


def final(repo: FeatureRepo) -> tuple[dict, dict]:
    """(weights, extra) of the follower's newest checkpoint."""
    path = latest_checkpoint(follow_dir(repo, "v1"))
    model, extra = load_checkpoint(path)
    return model.state_dict(), extra


def test_sigkill_then_resume_trains_every_entry_once_as_an_uninterrupted_run(
    world, redis_url, tmp_path
):
    _, after, _ = world
    split = PHASE1 * ENTRY_EVENTS

    # The uninterrupted reference: every entry in the stream, one --once run (in process).
    ref_repo, ref_ctx = make_repo(tmp_path / "ref", redis_url, world)
    put(ref_ctx, after)
    rep = follow(ref_ctx, "v1", FollowOptions(**OPTS, once=True))
    assert rep.steps == 12 and rep.entries == PHASE1 + PHASE2 and rep.events == len(after)
    ref_ids = stream_ids(ref_ctx)

    # The followed repo: phase 1 in the stream, a follower process, SIGKILL after it trained
    # all of phase 1 (its last checkpoint at step 4: steps 5 and 6 trained, not covered).
    repo, ctx = make_repo(tmp_path / "live", redis_url, world)
    put(ctx, after.iloc[:split])
    reader = SyncReader(repo, ctx.client, "v1")
    proc = cli(repo, redis_url)
    until_step(reader, proc, 6, "the follower did not train phase 1 in time")
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    killed_seq = reader.latest().seq
    assert latest_checkpoint(follow_dir(repo, "v1")).name == "step_00000004.pt"
    pending = ctx.events_stream.client.xpending(ctx.events_stream.key, trainer_group("v1"))
    assert pending["pending"] == 4  # the entries of steps 5 and 6: never acknowledged

    # Phase 2 arrives; the restarted follower resumes from step 4 and drains the stream.
    put(ctx, after.iloc[split:])
    proc = cli(repo, redis_url, "--once")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "fm train v1: step 10" in err and "12 steps" in out
    ids = stream_ids(ctx)
    assert len(ids) == len(ref_ids) == PHASE1 + PHASE2

    weights, extra = final(repo)
    ref_weights, ref_extra = final(ref_repo)
    state, ref_state = extra["caller"]["follow"], ref_extra["caller"]["follow"]
    # Every entry trained exactly once, in stream order, in the same steps as the reference.
    trained = [i for _, step_ids in state["steps"] for i in step_ids]
    assert trained == ids
    assert [s for s, _ in state["steps"]] == list(range(1, 13))
    as_positions = [[ids.index(i) for i in s] for _, s in state["steps"]]
    assert as_positions == [[ref_ids.index(i) for i in s] for _, s in ref_state["steps"]]
    assert state["position"] == ids[-1] and state["events"] == len(after)
    assert ctx.events_stream.client.xpending(ctx.events_stream.key, "trainer:v1")["pending"] == 0
    # ... hence the weights (and progressive NE) of the run that never stopped.
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], ref_weights[k], atol=1e-5, rtol=0)
    for task, sums in extra["ne_state"].items():
        assert sums == pytest.approx(ref_extra["ne_state"][task])

    # Sync: seqs only grow across the restart, and a reader that holds the published v1
    # weights (seq 0) follows the updates to the trainer's synced state.
    seqs = [a.seq for a in reader.announcements()]
    assert seqs == sorted(set(seqs)) and seqs[-1] == state["sync"]["seq"] > killed_seq
    published, _ = load_checkpoint(repo.checkpoints_dir / "v1.pt")
    start = tae_state(published.state_dict())
    serving = SyncReader(repo, ctx.client, "v1").catch_up(
        SyncedState(start, 0, state_digest(start))
    )
    assert (serving.seq, serving.digest) == (state["sync"]["seq"], state["sync"]["digest"])
    for c in (ctx, ref_ctx):
        c.close()


def test_entries_a_checkpoint_covers_are_skipped_when_their_ack_was_lost(
    world, redis_url, tmp_path, monkeypatch
):
    """A crash between writing a checkpoint and acknowledging its entries: the restarted
    follower gets them again, skips them (acknowledging them now) and trains only the rest."""
    _, after, _ = world
    repo, ctx = make_repo(tmp_path / "lost", redis_url, world)
    put(ctx, after.iloc[: 8 * ENTRY_EVENTS])
    stream = ctx.events_stream

    class Crash(Exception):
        pass

    def crash(group, entries):
        raise Crash

    monkeypatch.setattr(stream, "ack", crash)
    opts = FollowOptions(checkpoint_every=2, sync_every=0, max_steps=2)
    with pytest.raises(Crash):  # the checkpoint at step 2 is written, its ack never happens
        follow(ctx, "v1", opts)
    monkeypatch.undo()
    assert latest_checkpoint(follow_dir(repo, "v1")).name == "step_00000002.pt"
    group = trainer_group("v1")
    assert stream.client.xpending(stream.key, group)["pending"] == 8  # 4 trained, 4 read ahead

    rep = follow(ctx, "v1", FollowOptions(checkpoint_every=2, sync_every=0, once=True))
    assert rep.steps == 4 and rep.entries == 4  # only the 4 entries after the position
    _, extra = final(repo)
    steps = extra["caller"]["follow"]["steps"]
    assert [i for _, s in steps for i in s] == stream_ids(ctx)
    assert stream.client.xpending(stream.key, group)["pending"] == 0
    ctx.close()


def test_only_an_active_published_version_is_followed(world, redis_url, tmp_path):
    from api.services.errors import Conflict, Invalid, NotFound

    repo, ctx = make_repo(tmp_path / "bad", redis_url, world)
    with pytest.raises(NotFound, match="unknown FM version 'v7'"):
        follow(ctx, "v7", FollowOptions(once=True))
    with pytest.raises(Invalid, match="--sync-fraction"):
        follow(ctx, "v1", FollowOptions(sync_fraction=0.0))
    manifest = repo.load_manifest()
    manifest.versions["v1"].status = "retired"
    repo.save_manifest(manifest)
    with pytest.raises(Conflict, match="v1 is retired"):
        follow(ctx, "v1", FollowOptions(once=True))
    assert not follow_dir(repo, "v1").exists()
    np.testing.assert_equal(ctx.events_stream.length(), 0)
    ctx.close()


def test_sigterm_finishes_the_batch_checkpoints_and_exits_0(world, redis_url, tmp_path):
    _, after, _ = world
    repo, ctx = make_repo(tmp_path / "term", redis_url, world)
    put(ctx, after.iloc[: 6 * ENTRY_EVENTS])  # three steps
    reader = SyncReader(repo, ctx.client, "v1")
    proc = cli(repo, redis_url)
    until_step(reader, proc, 3, "the follower did not train in time")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "3 steps" in out
    _, extra = final(repo)
    assert extra["step"] == 3 and extra["caller"]["follow"]["position"] == stream_ids(ctx)[-1]
    stream = ctx.events_stream
    assert stream.client.xpending(stream.key, trainer_group("v1"))["pending"] == 0
    ctx.close()
