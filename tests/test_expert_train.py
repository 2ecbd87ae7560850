"""`foundex expert train`: the demo's expert training as a command, and an unpublished FM
checkpoint's TAEs computed on the fly (point in time, nothing written) beside the published
version's."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT

FOUNDEX = [sys.executable, "-m", "api.cli"]


def run_cli(args: list[str], redis_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, REDIS_URL=redis_url)
    return subprocess.run(FOUNDEX + args, cwd=ROOT, env=env, capture_output=True, text=True)


def pinned_to(report, version: str) -> str:
    return next(n for n, v in report.experts.items() if v == version)


@pytest.fixture(scope="module")
def repo_copy(demo_repo, tmp_path_factory):
    """A private copy of the demo repo: the shared one stays untouched."""
    from store_bridge.repo import FeatureRepo

    repo, report = demo_repo
    path = tmp_path_factory.mktemp("expert_train") / "feature_repo"
    shutil.copytree(repo.path, path, ignore=shutil.ignore_patterns("redis"))
    return FeatureRepo(path), report


@pytest.fixture(scope="module")
def candidate(repo_copy, tmp_path_factory) -> Path:
    """An unpublished checkpoint of v1's width: v1's FM with every weight nudged, so its TAEs
    differ from the published ones. Kept outside the repo."""
    import torch

    from fm import load_checkpoint, save_checkpoint

    repo, _ = repo_copy
    model, _ = load_checkpoint(repo.data / "training" / "fm_small.pt")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("candidate") / "fm_candidate.pt"
    save_checkpoint(model, path, {"label": "candidate"})
    return path


def event_log(repo):
    from store_bridge.events.schema import DatasetSpec

    return pd.read_parquet(repo.events_dir / "events.parquet"), DatasetSpec.load(
        repo.events_dir / "spec.json"
    )


def test_on_the_fly_taes_equal_what_logging_the_checkpoint_writes(
    repo_copy, candidate, redis_url, tmp_path
):
    """Log the candidate with the logging tier into a scratch copy, read it back with the
    point-in-time join, and compare with the on-the-fly TAEs row by row (fp32, 1e-5)."""
    import redis

    from api.services.expert_training import load_checkpoint_taes
    from fm import UserHistories
    from store_bridge.events.schema import EVENT_TIMESTAMP, time_windows
    from store_bridge.fm_tier import load_tae_function
    from store_bridge.logging_tier import log_version, prepare_impressions
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.repo import FeatureRepo, FMVersion
    from store_bridge.training_set import point_in_time_join

    repo, _ = repo_copy
    events, spec = event_log(repo)
    start = time_windows(events)["expert_train"][0]
    rows = events[events[EVENT_TIMESTAMP] >= start][["user_id", "item_id", EVENT_TIMESTAMP,
                                                      "surface"]].reset_index(drop=True)
    assert rows["surface"].nunique() == len(spec.surfaces) > 1  # every surface's rows

    on_the_fly = load_checkpoint_taes(candidate, 32, events, spec).embeddings(rows)

    # The logging tier, as it would log the checkpoint were it published as v9.
    scratch = FeatureRepo(tmp_path / "scratch")
    scratch.data.mkdir(parents=True)
    entry = FMVersion(
        version="v9", dim=32, checkpoint=str(candidate), digest="0" * 64,
        training_window=("2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"),
        created_at="2026-01-02T00:00:00+00:00",
    )  # fmt: skip
    store = RedisEmbeddingStore(redis.Redis.from_url(redis_url), "expert_train_scratch")
    fn = load_tae_function(scratch, entry, UserHistories.from_events(events, spec.surfaces))
    rep = log_version(scratch, store, "v9", fn, prepare_impressions(rows, spec.surfaces),
                      progress=False, chunk_rows=500)
    assert rep.rows > 0 and rep.files > 0
    logged = point_in_time_join(
        rows, tae_glob=scratch.tae_dir("v9") / "*" / "*.parquet", ttl_seconds=entry.ttl_seconds
    )["embedding"]

    assert len(on_the_fly) == len(logged) == len(rows)
    assert sum(e is not None for e in on_the_fly) == rep.rows
    for got, want in zip(on_the_fly, logged, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    # Not vacuous: the candidate's TAEs are not the published v1's for the same rows.
    published = point_in_time_join(
        rows, tae_glob=repo.tae_dir("v1") / "*" / "*.parquet", ttl_seconds=None
    )["embedding"]
    k = next(i for i, e in enumerate(published) if e is not None and on_the_fly[i] is not None)
    assert np.abs(published[k] - on_the_fly[k]).max() > 1e-3


def test_on_the_fly_taes_see_only_history_strictly_before_the_row(repo_copy, candidate):
    """Brute force for a few rows: an engine given only the events strictly before the row's
    time (nothing later exists for it) gives the same TAE."""
    from api.services.expert_training import load_checkpoint_taes
    from fm import TAEEngine, UserHistories, load_checkpoint
    from fm.timefeatures import timestamps_us
    from store_bridge.events.schema import EVENT_TIMESTAMP, time_windows

    repo, _ = repo_copy
    events, spec = event_log(repo)
    model, _ = load_checkpoint(candidate)
    after = events[events[EVENT_TIMESTAMP] >= time_windows(events)["eval"][0]]
    rows = after.iloc[[0, len(after) // 2, len(after) - 1]][
        ["user_id", "item_id", EVENT_TIMESTAMP, "surface"]
    ].reset_index(drop=True)
    got = load_checkpoint_taes(candidate, 32, events, spec).embeddings(rows)
    for k, row in rows.iterrows():
        before = events[events[EVENT_TIMESTAMP] < row[EVENT_TIMESTAMP]]
        engine = TAEEngine(model, UserHistories.from_events(before, spec.surfaces))
        want = engine.compute(
            np.array([row["user_id"]]), np.array([row["item_id"]]),
            timestamps_us(rows[EVENT_TIMESTAMP].iloc[[k]]), np.array([row["surface"]]),
        )[0]  # fmt: skip
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-5)


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` -> sha256 of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def redis_snapshot(url: str) -> dict[bytes, bytes]:
    import redis

    client = redis.Redis.from_url(url)
    return {k: client.dump(k) for k in client.scan_iter(count=1000)}


def ne_rows(stdout: str) -> dict[str, list[str]]:
    """task -> the cells of the NE table printed by `foundex expert train`."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}


def test_cli_checkpoint_run_prints_both_nes_and_writes_nothing(repo_copy, candidate, redis_url):
    repo, report = repo_copy
    name = pinned_to(report, "v1")
    files, keys = snapshot(repo.path), redis_snapshot(redis_url)
    ckpt_before = candidate.read_bytes()

    proc = run_cli(["expert", "train", name, "--fm-checkpoint", str(candidate),
                    "--repo", str(repo.path), "--no-progress"], redis_url)
    assert proc.returncode == 0, proc.stderr
    assert f"NE v1 (published) | NE {candidate.name} (checkpoint)" in proc.stdout
    table = ne_rows(proc.stdout)
    assert list(table) == list(report.expert_ne[name])  # one row per task
    for task, (published, with_ckpt, _diff) in table.items():
        # The published column is the demo's own expert, trained again the same way.
        assert published == f"{report.expert_ne[name][task]:.4f}", task
        assert 0 < float(with_ckpt) < 10, (task, with_ckpt)

    assert snapshot(repo.path) == files  # no parquet, no manifest change, no saved model
    assert redis_snapshot(redis_url) == keys
    assert candidate.read_bytes() == ckpt_before


def test_train_without_checkpoint_is_the_demos_training(repo_copy):
    """The use-case on the pinned version's logged TAEs gives the demo's NE exactly and saves
    the expert where serving loads it."""
    from api.services.context import ServiceContext
    from api.services.expert_training import train_expert_use_case
    from api.settings import Settings
    from experts import load_expert

    repo, report = repo_copy
    name = pinned_to(report, "v2")
    model_path = repo.models_dir / f"{name}.pt"
    model_path.unlink()
    ctx = ServiceContext(Settings(repo=repo.path), "redis://127.0.0.1:1/0")  # never dialled
    rep = train_expert_use_case(ctx, name)
    assert rep.published.ne == report.expert_ne[name]
    assert rep.candidate is None and rep.saved == model_path
    assert load_expert(model_path).tae_dim == 64
    assert rep.published.train_rows > 0 and rep.published.eval_rows > 0


@pytest.mark.parametrize(
    "case",
    ["missing", "not_a_checkpoint", "width", "unknown_expert", "no_fm_expert"],
)
def test_cli_errors_are_one_line_exit_2(repo_copy, tmp_path, redis_url, case):
    repo, report = repo_copy
    name = pinned_to(report, "v1")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint\n")
    args, needle = {
        "missing": ([name, "--fm-checkpoint", str(tmp_path / "nope.pt")],
                    "FM checkpoint not found"),
        "not_a_checkpoint": ([name, "--fm-checkpoint", str(junk)],
                             "is not a foundex-fm/1 checkpoint"),
        # v2's checkpoint is 64-d, the expert pins 32-d v1
        "width": ([name, "--fm-checkpoint", str(repo.data / "training" / "fm_large.pt")],
                  "gives 64-d TAEs; the expert's pinned version is 32-d"),
        "unknown_expert": (["nobody"], "unknown expert 'nobody'"),
        "no_fm_expert": ([pinned_to(report, None), "--fm-checkpoint", str(junk)],
                         "pins no FM version"),
    }[case]
    files = snapshot(repo.path)
    proc = run_cli(["expert", "train", *args, "--repo", str(repo.path)], redis_url)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert snapshot(repo.path) == files
