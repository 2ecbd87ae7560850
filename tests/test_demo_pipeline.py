"""The demo pipeline at tiny size, end to end, and what it leaves behind for Feast and the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from store_bridge.redis_server import FEAST_ENV, feast_connection_string
from tests.conftest import feast_cli

FOUNDEX = [sys.executable, "-m", "api.cli"]
ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], redis_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, REDIS_URL=redis_url)
    return subprocess.run(FOUNDEX + args, cwd=ROOT, env=env, capture_output=True, text=True)


def test_demo_report(demo_repo):
    repo, report = demo_repo
    assert set(report.fm_ne) == {"v1", "v2"}
    assert len(report.expert_ne) == 3 and None in report.experts.values()
    for ne in report.expert_ne.values():
        assert ne and all(math.isfinite(x) and x > 0 for x in ne.values()), ne
    unseen = report.unseen_tasks[0]
    assert all(unseen in ne for ne in report.expert_ne.values())  # experts learn it; the FM never does
    assert all(unseen not in ne for ne in report.fm_ne.values())
    assert {r.version for r in report.logging} == {"v1", "v2"}
    assert all(r.rows > 0 and r.online_written > 0 for r in report.logging)
    assert report.windows["expert_train"][0] == report.windows["fm"][1]
    from api.pipeline import ne_table

    table = ne_table(report)
    assert "TR v1->v2" in table and f"{unseen} (unseen by FM)" in table
    assert len(table.splitlines()) == 2 + len(next(iter(report.expert_ne.values())))


def test_the_live_stage_replays_the_log_tail_through_the_stream(demo_repo, redis_url):
    """The last stage replays the log's last 5% re-timed to now as new users' events: every
    replayed event is in the offline live log (beside the visibility probes) and in its user's
    online history at its new time; the log's own users' histories are as the log has them;
    the consumers caught up; one visibility latency per probe."""
    from api.pipeline import LIVE_PROBES, LIVE_SHARE
    from api.services.consumers import live_log_dir
    from api.services.context import ServiceContext
    from api.settings import Settings
    from store_bridge.events.schema import timestamps_us
    from store_bridge.streams.offline_log import read_live_log

    repo, report = demo_repo
    live = report.live
    events = pd.read_parquet(repo.events_dir / "events.parquet")
    n = int(len(events) * LIVE_SHARE)
    assert live.events == n and live.fm_version == "v1" and live.user_offset == 100  # 60 users
    assert 0 < live.ingest_s <= live.caught_up_s
    assert len(live.visibility_ms) == LIVE_PROBES and all(x > 0 for x in live.visibility_ms)
    assert live.visibility(0.5) <= live.visibility(0.99)
    ctx = ServiceContext(Settings(repo=repo.path, redis_url=redis_url), redis_url,
                         redis_timeout_s=10)
    try:
        logged = read_live_log(live_log_dir(ctx))
        probes = logged["event_id"].str.startswith("probe-")
        replayed = logged[~probes]
        assert len(replayed) == n and replayed["event_id"].is_unique and probes.sum() == LIVE_PROBES
        tail = events.sort_values("event_timestamp", kind="stable").tail(n)
        # the same events (items, surfaces, actions, gaps), moved by one shift, users + 100
        shift = timestamps_us(replayed["event_timestamp"]).max() - timestamps_us(
            tail["event_timestamp"]).max()
        assert shift > 0
        got = replayed.assign(ts=timestamps_us(replayed["event_timestamp"]) - shift,
                              user_id=replayed["user_id"] - 100)
        want = tail.assign(ts=timestamps_us(tail["event_timestamp"]))
        keys = ["user_id", "item_id", "ts", "surface", "action"]
        assert sorted(map(tuple, got[keys].to_numpy().tolist())) == sorted(
            map(tuple, want[keys].to_numpy().tolist()))
        for user in replayed["user_id"].unique()[:5]:
            mine = timestamps_us(replayed[replayed["user_id"] == user]["event_timestamp"])
            assert set(mine.tolist()) <= set(ctx.histories.read(int(user)).ts_us.tolist())
        for user in events["user_id"].unique()[:10]:  # the log's users: as the log has them
            assert len(ctx.histories.read(int(user))) == (events["user_id"] == user).sum()
        lag = {g.group: g.events for g in ctx.events_stream.lag()}
        assert lag["histories"] == 0 and lag["offline"] == 0
    finally:
        ctx.close()


def test_feast_reads_what_the_demo_wrote(demo_repo, redis_url):
    from feast import FeatureStore

    repo, _ = demo_repo
    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    tae = pd.read_parquet(repo.tae_dir("v1"))
    latest = tae.sort_values("event_timestamp").drop_duplicates(["user_id", "item_id"], keep="last")
    sample = latest.head(20)
    fs = FeatureStore(repo_path=str(repo.path))
    got = fs.get_online_features(
        ["fm_tae_v1:embedding"],
        entity_rows=[{"user_id": int(u), "item_id": int(i)} for u, i in zip(sample.user_id, sample.item_id, strict=True)],
    ).to_dict()
    for want, have in zip(sample["embedding"], got["embedding"], strict=True):
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-6)
    # the historical path reads the same partitioned offline files through the view's source
    entity = sample[["user_id", "item_id", "event_timestamp"]].reset_index(drop=True)
    hist = fs.get_historical_features(entity_df=entity, features=["fm_tae_v1:embedding"]).to_df()
    assert hist["embedding"].notna().all() and len(hist) == len(entity)


def test_feast_apply_again_keeps_versions_and_experts(demo_repo, redis_url):
    from feast import FeatureStore

    repo, report = demo_repo
    env = dict(os.environ, **{FEAST_ENV: feast_connection_string(redis_url)})
    proc = subprocess.run([feast_cli(), "apply"], cwd=repo.path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Every source validates: the TAE views' partitioned files included (no "FileSource path
    # does not exist" for a glob whose files are there).
    output = proc.stdout + proc.stderr
    assert "Could not validate" not in output and "does not exist" not in output, output
    fs = FeatureStore(repo_path=str(repo.path))
    views = {v.name: v for v in fs.list_feature_views()}
    assert {"fm_tae_v1", "fm_tae_v2", "item_features", "user_history"} <= set(views)
    assert views["fm_tae_v2"].tags["dim"] == "64" and views["fm_tae_v1"].tags["status"] == "active"
    services = {s.name: s for s in fs.list_feature_services()}
    assert set(report.experts) <= set(services)
    for name, version in report.experts.items():
        pinned = [p.name for p in services[name].feature_view_projections if p.name.startswith("fm_tae_")]
        assert pinned == ([f"fm_tae_{version}"] if version else [])


def test_cli_lists_and_refuses_retiring_a_pinned_version(demo_repo, redis_url):
    repo, report = demo_repo
    out = run_cli(["fm", "list", "--repo", str(repo.path)], redis_url)
    assert out.returncode == 0, out.stderr
    assert "v1\tactive" in out.stdout and "v2\tactive" in out.stdout
    out = run_cli(["fm", "retire", "v1", "--repo", str(repo.path)], redis_url)
    assert out.returncode == 2
    pinned = [n for n, v in report.experts.items() if v == "v1"]
    assert all(n in out.stderr for n in pinned) and "--force" in out.stderr
    assert repo.load_manifest().versions["v1"].status == "active"


def test_cli_training_set(demo_repo, redis_url, tmp_path):
    repo, report = demo_repo
    name = next(n for n, v in report.experts.items() if v == "v2")
    tae = pd.read_parquet(repo.tae_dir("v2")).head(30)
    from experts import load_expert_configs

    tasks = next(c.tasks for c in load_expert_configs(repo.experts_dir) if c.name == name)
    # one label column per task of the expert (NaN where a task does not apply)
    entities = tae[["user_id", "item_id", "event_timestamp"]].assign(
        **{t: (1.0 if i == 0 else np.nan) for i, t in enumerate(tasks)}
    )
    entities.to_parquet(tmp_path / "labels.parquet")
    out = run_cli(
        ["training-set", "--expert", name, "--entities", str(tmp_path / "labels.parquet"),
         "--out", str(tmp_path / "ts.parquet"), "--repo", str(repo.path)],
        redis_url,
    )
    assert out.returncode == 0, out.stderr
    ts = pd.read_parquet(tmp_path / "ts.parquet")
    assert len(ts) == 30 and ts["embedding"].notna().all()
    np.testing.assert_allclose(np.stack(ts["embedding"]), np.stack(tae["embedding"]), atol=0)
    bad = run_cli(
        ["training-set", "--expert", "nope", "--entities", str(tmp_path / "labels.parquet"),
         "--out", str(tmp_path / "x.parquet"), "--repo", str(repo.path)],
        redis_url,
    )
    assert bad.returncode == 2 and "unknown expert 'nope'" in bad.stderr


def test_expert_pinning_unknown_version_fails_feast_apply(feature_repo, redis_url):
    from experts import ExpertConfig, save_expert_config
    from store_bridge.repo import FeastApplyError, FeatureRepo, feast_apply

    repo = FeatureRepo(feature_repo)
    save_expert_config(
        ExpertConfig(name="orphan", surface="feed", tasks=["click"], fm_version="v7"), repo.experts_dir
    )
    with pytest.raises(FeastApplyError, match="pins FM version 'v7'"):
        feast_apply(repo, redis_url)


def test_versions_log_and_serve_from_the_pruned_artifact(demo_repo):
    """Publishing exports the TAE-only artifact; logging and serving load it, and it gives
    the very TAEs that were logged."""
    import torch

    from fm import TAEEngine, UserHistories, load_checkpoint
    from store_bridge.events.files import read_dataset
    from store_bridge.events.schema import timestamps_us

    repo, _ = demo_repo
    entry = repo.load_manifest().versions["v2"]
    assert entry.serving_artifact and entry.model_path(repo).name == "v2.serving.pt"
    full, _ = load_checkpoint(repo.data / entry.checkpoint)
    pruned, _ = load_checkpoint(entry.model_path(repo))
    pruned_keys = set(pruned.state_dict())
    assert not any(k.startswith(("main_head.", "aux_heads.")) for k in pruned_keys)
    assert any(k.startswith("aux_heads.") for k in full.state_dict())
    assert (repo.data / entry.checkpoint).stat().st_size > entry.model_path(repo).stat().st_size
    logged = pd.read_parquet(repo.tae_dir("v2")).head(50)
    events, _, spec = read_dataset(repo.events_dir)
    keys = ["user_id", "item_id", "event_timestamp"]
    rows = logged.merge(events[[*keys, "surface", "hour"]], on=keys, how="left")  # logged order
    engine = TAEEngine(pruned, UserHistories.from_events(events, spec.surfaces))
    with torch.no_grad():
        got = engine.compute(
            rows["user_id"].to_numpy(), rows["item_id"].to_numpy(),
            timestamps_us(rows["event_timestamp"]), rows["surface"].to_numpy(),
        )
    np.testing.assert_allclose(got, np.stack(logged["embedding"]), atol=1e-6)
