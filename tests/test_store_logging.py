"""The logging tier: a real `foundex log` killed mid-way and rerun leaves exactly one offline
row per (user, item, time) and version, and online rows equal to the offline latest; NaN/Inf
embeddings are refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from store_bridge.events.schema import EVENT_TIMESTAMP, timestamps_us
from store_bridge.feast_layout import entity_keys, ts_field
from store_bridge.logging_tier import (
    BadEmbeddings,
    _job_id,
    log_version,
    prepare_impressions,
)
from store_bridge.online import RedisEmbeddingStore, _decode_ts_us
from store_bridge.redis_server import redis_client
from store_bridge.repo import FeatureRepo, FMVersion, Manifest

ROOT = Path(__file__).resolve().parent.parent


def make_fm_repo(path: Path, project: str) -> tuple[FeatureRepo, pd.DataFrame]:
    """A repo with synthetic events and two briefly trained FM versions in the manifest
    (no `feast apply`: logging reads only the manifest, checkpoints and events)."""
    from conftest import copy_feature_repo

    from fm import FMConfig, checkpoint_digest, save_checkpoint, train_streaming
    from store_bridge.events.files import write_dataset
    from store_bridge.events.synthetic import SyntheticConfig, generate

    copy_feature_repo(path)
    yaml_path = path / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", f"project: {project}"))
    repo = FeatureRepo(path)
    events, items, spec = generate(SyntheticConfig(n_users=40, n_items=60, n_categories=4, days=4))
    write_dataset(repo.events_dir, events, items, spec)
    end = events[EVENT_TIMESTAMP].quantile(0.5)
    kw = dict(
        n_items=spec.n_items, surfaces=spec.surfaces, main_tasks=spec.main_tasks,
        aux_tasks={s: spec.fm_aux_tasks(s) for s in spec.surfaces}, n_actions=spec.n_actions,
        max_history=16,
    )
    versions = {}
    repo.checkpoints_dir.mkdir(parents=True)
    for n, config in enumerate([FMConfig.small(**kw), FMConfig.large(**kw)], start=1):
        result = train_streaming(events, config, end=end, max_steps=2, progress=False)
        ckpt = repo.checkpoints_dir / f"v{n}.pt"
        save_checkpoint(result.model, ckpt, {"steps": result.steps})
        versions[f"v{n}"] = FMVersion(
            version=f"v{n}", dim=config.d_model, checkpoint=f"checkpoints/v{n}.pt",
            digest=checkpoint_digest(ckpt), training_window=("2026-01-05", end.isoformat()),
            created_at="2026-01-06",
        )
    repo.save_manifest(Manifest(versions=versions))
    return repo, events


def impressions_for(events: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """`n` distinct impressions on random (user, item, microsecond time) over two days."""
    rng = np.random.default_rng(seed)
    start = events[EVENT_TIMESTAMP].max().value // 1000
    users, items = events["user_id"].unique(), events["item_id"].unique()
    frame = pd.DataFrame(
        {
            "user_id": rng.choice(users, n),
            "item_id": rng.choice(items, n),
            EVENT_TIMESTAMP: pd.to_datetime(
                start + rng.integers(0, 2 * 86_400_000_000, n), unit="us", utc=True
            ),
            "surface": rng.choice(sorted(events["surface"].unique()), n),
            "hour": rng.integers(0, 24, n).astype(np.int8),
        }
    )
    # A few repeated (user, item) pairs at later times: online must keep the latest.
    again = frame.head(n // 10).copy()
    again[EVENT_TIMESTAMP] += pd.Timedelta(hours=1)
    return pd.concat([frame, again], ignore_index=True)


def offline_rows(repo: FeatureRepo, version: str) -> pd.DataFrame:
    files = sorted(repo.tae_dir(version).glob("*/*.parquet"))  # what the Feast source globs
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def assert_logged_exactly_once(repo: FeatureRepo, store, version: str, dim: int, imp) -> None:
    assert not list(repo.tae_dir(version).rglob("*.tmp")), "temp files left behind"
    off = offline_rows(repo, version)
    keys = ["user_id", "item_id", EVENT_TIMESTAMP]
    assert not off.duplicated(keys).any(), f"{version}: duplicated offline rows"
    want = imp[keys].assign(**{EVENT_TIMESTAMP: imp[EVENT_TIMESTAMP].astype("datetime64[us, UTC]")})
    got = off[keys].assign(**{EVENT_TIMESTAMP: off[EVENT_TIMESTAMP].astype("datetime64[us, UTC]")})
    assert len(got) == len(want)
    assert got.merge(want, how="inner", on=keys).shape[0] == len(want)
    # Online equals the offline latest per (user, item), embedding and event time.
    latest = off.sort_values(EVENT_TIMESTAMP).drop_duplicates(["user_id", "item_id"], keep="last")
    for user, rows in latest.groupby("user_id"):
        read = store.read(version, dim, int(user), rows["item_id"].to_numpy())
        assert read.missing == []
        np.testing.assert_array_equal(read.matrix, np.stack(rows["embedding"]).astype(np.float32))
    ks = entity_keys(store.project, {"user_id": latest["user_id"].to_numpy(),
                                     "item_id": latest["item_id"].to_numpy()})
    with store.client.pipeline(transaction=False) as pipe:
        for k in ks:
            pipe.hget(k, ts_field(f"fm_tae_{version}"))
        stored = [_decode_ts_us(raw) for raw in pipe.execute()]
    np.testing.assert_array_equal(stored, timestamps_us(latest[EVENT_TIMESTAMP]))


def test_log_killed_mid_way_and_rerun_is_exactly_once(tmp_path, redis_url):
    project = "log_kill"
    repo, events = make_fm_repo(tmp_path / "repo", project)
    imp = impressions_for(events, 3000)
    imp_path = tmp_path / "impressions.parquet"
    imp.to_parquet(imp_path, index=False)
    prepared = prepare_impressions(imp)
    job = _job_id(prepared)
    cmd = [sys.executable, "-m", "api.cli", "log", "--impressions", str(imp_path),
           "--repo", str(repo.path), "--no-progress", "--chunk-rows", "50"]
    env = dict(os.environ, REDIS_URL=redis_url)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list(repo.tae_dir("v1").glob("*/part-*.parquet"))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the log job wrote nothing in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = len(list(repo.tae_dir("v1").glob("*/part-*.parquet")))
    total_chunks = -(-len(prepared) // 50)
    assert written < total_chunks * 2, "the job finished before it was killed"
    # What a kill during a write leaves: a temp file, and a file from an earlier run that
    # chunked differently (its rows will be written again under other names).
    day = next(repo.tae_dir("v1").glob("*/"))
    (day / f".part-{job}-r50-00000.parquet.tmp").write_bytes(b"half a parquet file")
    stale = next(repo.tae_dir("v1").glob("*/part-*.parquet"))
    shutil.copy(stale, day / f"part-{job}-r999-00000.parquet")

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "chunks done by an earlier run" in rerun.stdout
    v1_line = next(line for line in rerun.stdout.splitlines() if line.startswith("v1:"))
    assert not v1_line.endswith(" 0 chunks done by an earlier run"), v1_line  # it resumed

    store = RedisEmbeddingStore(redis_client(redis_url), project)
    for v in repo.load_manifest().active():
        assert_logged_exactly_once(repo, store, v.version, v.dim, prepared)

    # A rerun with another chunk size replaces the job's files instead of adding to them.
    again = subprocess.run(cmd[:-1] + ["700"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    for v in repo.load_manifest().active():
        assert_logged_exactly_once(repo, store, v.version, v.dim, prepared)


def test_nan_and_inf_embeddings_are_refused(tmp_path, redis_url):
    from conftest import copy_feature_repo

    repo = FeatureRepo(copy_feature_repo(tmp_path / "repo"))
    store = RedisEmbeddingStore(redis_client(redis_url), "log_nan")
    imp = prepare_impressions(
        pd.DataFrame(
            {
                "user_id": [1, 2, 3, 4], "item_id": [5, 6, 7, 8],
                EVENT_TIMESTAMP: pd.to_datetime(["2026-01-05"] * 4, utc=True)
                + pd.to_timedelta([0, 1, 2, 3], unit="s"),
                "surface": ["feed"] * 4, "hour": [1] * 4,
            }
        )
    )
    for bad_value in (np.nan, np.inf, -np.inf):

        def fm(u, i, t, s, bad_value=bad_value):
            m = np.ones((len(u), 4), np.float32)
            m[u == 4, 2] = bad_value  # only the second chunk is bad
            return m

        with pytest.raises(BadEmbeddings, match="NaN/Inf for 1 of 2 rows .*user 4, item 8"):
            log_version(repo, store, "v1", fm, imp, chunk_rows=2, progress=False)
        # The first chunk was stored, nothing of the bad chunk: not offline, not online.
        off = offline_rows(repo, "v1")
        assert sorted(off["user_id"]) == [1, 2]
        assert store.read("v1", 4, 3, np.array([7])).missing == [0]
        assert store.read("v1", 4, 4, np.array([8])).missing == [0]
        assert store.read("v1", 4, 1, np.array([5])).missing == []


def test_log_skips_unknown_items_counts_them_and_exits_0(tmp_path, redis_url):
    """Items the FM does not know, among the candidates (skipped, counted, one warning line)
    and in a user's history (the OOV row), never fail `foundex log`."""
    from store_bridge.events.files import read_dataset, write_dataset
    from store_bridge.fm_tier import load_tae_function, repo_histories

    project = "log_oov"
    repo, events = make_fm_repo(tmp_path / "repo", project)
    n_items = 60  # the FMs' vocabulary: make_fm_repo's synthetic items 0..59
    # New items reach the event log after the FMs were trained: user 3 watched two of them.
    ev, items, spec = read_dataset(repo.events_dir)
    late = ev[EVENT_TIMESTAMP].max()
    extra = ev[ev["user_id"] == 3].tail(2).copy()
    extra["item_id"] = [n_items + 15, -2]
    extra[EVENT_TIMESTAMP] = [late + pd.Timedelta(1, "s"), late + pd.Timedelta(2, "s")]
    extra["request_id"] = ev["request_id"].max() + 1 + np.arange(2)
    grown = pd.concat([ev, extra], ignore_index=True)
    grown[EVENT_TIMESTAMP] = grown[EVENT_TIMESTAMP].astype("datetime64[us, UTC]")
    write_dataset(repo.events_dir, grown, items, spec)

    when = late + pd.Timedelta(1, "h")
    imp = pd.DataFrame({
        "user_id": [3, 3, 3, 3, 5], "item_id": [5, n_items + 15, 0, -1, 7],
        EVENT_TIMESTAMP: [when] * 5, "surface": ["feed"] * 5,
    })
    imp_path = tmp_path / "impressions.parquet"
    imp.to_parquet(imp_path, index=False)
    cmd = [sys.executable, "-m", "api.cli", "log", "--impressions", str(imp_path),
           "--repo", str(repo.path), "--no-progress"]
    run = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, REDIS_URL=redis_url),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "does not know" in line]
    assert len(warnings) == 2, run.stderr  # one per active version
    assert all("skipped 2 of 5 impressions" in w and "-1, 75" in w for w in warnings), warnings
    assert "v1: 3 rows" in run.stdout and "v2: 3 rows" in run.stdout, run.stdout

    store = RedisEmbeddingStore(redis_client(redis_url), project)
    histories = repo_histories(repo)
    for v in repo.load_manifest().active():
        off = offline_rows(repo, v.version).sort_values(["user_id", "item_id"])
        assert off[["user_id", "item_id"]].values.tolist() == [[3, 0], [3, 5], [5, 7]]
        # what was stored is the FM's TAE, the user's OOV history items included
        fn = load_tae_function(repo, v, histories)
        want = fn(off["user_id"].to_numpy(), off["item_id"].to_numpy(),
                  timestamps_us(off[EVENT_TIMESTAMP]), np.array(["feed"] * 3))
        np.testing.assert_allclose(np.stack(off["embedding"]), want, atol=1e-6)
        assert np.isfinite(want).all()
        assert store.read(v.version, v.dim, 3, np.array([n_items + 15, -1])).missing == [0, 1]
        assert store.read(v.version, v.dim, 3, np.array([0, 5])).missing == []

    # in-process: the report counts them; a function that cannot tell logs every row
    fn = load_tae_function(repo, repo.load_manifest().versions["v1"], histories)
    rep = log_version(repo, store, "v1", fn, prepare_impressions(imp), progress=False)
    assert (rep.rows, rep.unknown_items) == (3, 2)
    only_unknown = prepare_impressions(imp[imp["item_id"] < 0])
    rep = log_version(repo, store, "v1", fn, only_unknown, progress=False)
    assert (rep.rows, rep.unknown_items, rep.files) == (0, 1, 0)
