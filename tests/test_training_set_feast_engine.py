"""`foundex training-set --engine feast` on Feast's Ray offline store, on a real local Ray
runtime: the rows equal the in-memory join's and the point-in-time oracle's (ties, TTL expiry,
rows without an embedding or item features, repeated rows, naive times); the CLI end to end;
a bad engine is refused; the Ray that the engine starts leaves no process behind.

One Ray runtime, started as the engine starts it, serves the module (a start costs seconds,
its workers' first Feast import more); the last test ends it and looks for what is left."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import copy_feature_repo
from test_training_set import T0, labels_frame, oracle, write_taes
from typer.testing import CliRunner

from api.cli import app

TTL_S = 20
SEC = 1_000_000
MARKER = "FOUNDEX_TEST_RAY_MARKER"
# v2's TAEs, in this file order: two in one second (the later one first), one at 5.5 s.
SUBSECOND_TAES = [(0, 0, T0 + 10_800_000), (0, 0, T0 + 10_300_000), (1, 1, T0 + 5_500_000)]


@pytest.fixture(scope="module")
def ray_repo(tmp_path_factory, redis_url):
    """A repo whose feature_store.yaml says `type: ray` (no storage_path: foundex's default),
    v1 (3-d, TTL 20 s) with TAEs for users 0-2 x items 0-2 over a minute on whole seconds,
    v2 with SUBSECOND_TAES, items 0-2 with features from T0 (item 1 changes at T0 + 30 s),
    expert e1 pinning v1; `feast apply` run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from experts import ExpertConfig, save_expert_config
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply

    path = copy_feature_repo(tmp_path_factory.mktemp("ray") / "feature_repo")
    yaml_path = path / "feature_store.yaml"
    text = yaml_path.read_text().replace("project: foundex", f"project: ray_{uuid.uuid4().hex[:8]}")
    yaml_path.write_text(text.replace(  # one CPU: one worker pays the import of Feast
        "offline_store:\n  type: duckdb\n", "offline_store:\n  type: ray\n  ray_conf: {num_cpus: 1}\n"
    ))
    repo = FeatureRepo(path)
    repo.save_manifest(Manifest(versions={v: FMVersion(
        version=v, dim=3, checkpoint=f"{v}.pt", digest="d", ttl_seconds=ttl,
        training_window=("2026-01-01", "2026-01-02"), created_at="2026-01-02",
    ) for v, ttl in (("v1", TTL_S), ("v2", 3600))}))
    save_expert_config(ExpertConfig(name="e1", surface="feed", tasks=["click"], fm_version="v1"),
                       repo.experts_dir)
    rng = np.random.default_rng(5)
    taes = sorted({(int(rng.integers(3)), int(rng.integers(3)), T0 + int(rng.integers(60)) * SEC)
                   for _ in range(30)})
    write_taes(repo.tae_dir("v1"), taes)
    write_taes(repo.tae_dir("v2"), SUBSECOND_TAES)
    pq.write_table(pa.table({
        "item_id": pa.array([0, 1, 2, 1], pa.int64()),
        "category": pa.array([5, 6, 7, 8], pa.int64()),
        "quality": pa.array([0.5, 0.25, 0.125, 0.75], pa.float32()),
        "event_timestamp": pa.array([T0, T0 + 30 * SEC, T0, T0 - 10 * SEC],
                                    pa.timestamp("us", tz="UTC")),
    }), repo.data / "items.parquet")
    feast_apply(repo, redis_url)
    return repo, taes


@pytest.fixture(scope="module")
def feature_store(ray_repo, redis_url):
    from api.services.context import ServiceContext
    from api.settings import Settings

    settings = Settings()
    settings.repo = ray_repo[0].path
    return ServiceContext(settings, redis_url).feature_store


@pytest.fixture(scope="module")
def ray_session(ray_repo, feature_store):
    """Ray started by the engine's own session code (local, as `--engine feast` starts it),
    held for the module; a marker in the environment that Ray's processes inherit lets
    `test_ray_processes_end_with_the_session` find any left behind."""
    import ray

    from store_bridge.feast_training_set import offline_store_session

    assert not ray.is_initialized()
    marker = uuid.uuid4().hex
    os.environ[MARKER] = marker
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(offline_store_session(feature_store, ray_repo[0]))
    finally:
        del os.environ[MARKER]
    assert ray.is_initialized() and _processes_with(marker)
    yield SimpleNamespace(marker=marker, close=stack.close)
    stack.close()


def _processes_with(marker: str) -> list[str]:
    """Live processes whose environment holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                stat = (proc / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies hold nothing
                    found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:  # gone, or not ours to read
            continue
    return found


def _label_rows(taes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(6)
    rows = [(int(rng.integers(3)), int(rng.integers(4)), T0 + int(rng.integers(-5, 90)) * SEC)
            for _ in range(40)]  # item 3 has no features; times before every TAE too
    rows += [(u, i, t) for u, i, t in taes[:6]]  # at a TAE's own time (ties)
    rows += [(u, i, t + TTL_S * SEC) for u, i, t in taes[6:12]]  # at the TTL's edge
    rows += [(u, i, t + TTL_S * SEC + 1) for u, i, t in taes[12:18]]  # 1 us past it
    rows += [(9, 0, T0 + 10 * SEC), (9, 0, T0 + 10 * SEC)]  # an unknown user, twice
    return rows + rows[:4]  # repeated rows


def _naive(frame: pd.DataFrame) -> pd.DataFrame:
    """The same label rows with naive times (UTC), which both engines take as UTC."""
    return frame.assign(event_timestamp=frame["event_timestamp"].dt.tz_localize(None))


def _embedding_index(e) -> int | None:
    return None if e is None else int(e[0])  # write_taes: TAE k is [k, k, k]


def test_feast_engine_rows_equal_in_memory_join_and_oracle(ray_session, ray_repo, feature_store):
    from store_bridge.feast_training_set import feast_training_set
    from store_bridge.training_set import expert_training_set

    repo, taes = ray_repo
    entry = repo.load_manifest().versions["v1"]
    rows = _label_rows(taes)
    frame = _naive(labels_frame(rows))
    ours = expert_training_set(repo, frame.copy(), entry)
    theirs = feast_training_set(feature_store, repo, frame.copy(), entry)

    assert list(theirs.columns) == list(ours.columns)
    pd.testing.assert_frame_equal(theirs.drop(columns="embedding"), ours.drop(columns="embedding"))
    for k, (a, b) in enumerate(zip(ours["embedding"], theirs["embedding"], strict=True)):
        assert (a is None) == (b is None), rows[k]
        if a is not None:
            assert b.dtype == np.float32 and not b.flags.writeable
            np.testing.assert_array_equal(a, b)
    want = oracle(taes, rows, TTL_S * SEC)
    assert [_embedding_index(e) for e in theirs["embedding"]] == want
    # Not vacuous: matches, TTL expiries (a TAE at or before the row, yet none in range),
    # rows without item features.
    expired = [k for k, (u, i, t) in enumerate(rows) if want[k] is None
               and any(tu == u and ti == i and tt <= t for tu, ti, tt in taes)]
    assert sum(w is not None for w in want) > 15 and len(expired) >= 6
    assert theirs["category"].isna().sum() > 0

    # The no-FM baseline: item features alone, no embedding column.
    base = feast_training_set(feature_store, repo, frame.copy(), None, ["quality"])
    pd.testing.assert_frame_equal(base, expert_training_set(repo, frame.copy(), None, ["quality"]))


def test_feast_ray_store_alone_ignores_the_ttl(ray_session, ray_repo, feature_store):
    """Why the engine checks the TTL itself: Feast 0.67's Ray store returns, for a row, the
    latest TAE at or before it however old (the DuckDB store applies the view's TTL). If this
    fails, Feast applies the TTL now and the engine's own check (and README note) can go."""
    repo, taes = ray_repo
    rows = [(u, i, t + TTL_S * SEC + 1) for u, i, t in taes]  # every TAE, just past its TTL
    rows = [r for r, w in zip(rows, oracle(taes, rows, TTL_S * SEC), strict=True) if w is None]
    assert rows
    got = feature_store.get_historical_features(  # storage_path: set by the session
        entity_df=labels_frame(rows), features=["fm_tae_v1:embedding"]
    ).to_df()
    stale = [e for e in got["embedding"]
             if e is not None and not (np.isscalar(e) and pd.isna(e)) and len(e) > 0]
    assert len(stale) == len(rows)  # every one of them got an expired embedding


def test_feast_engine_refuses_what_whole_second_times_get_wrong(ray_session, ray_repo,
                                                                feature_store):
    """Feast's Ray store compares times in whole seconds and keeps one feature row per key and
    second: the engine orders each batch by time so that it keeps the latest (right for rows
    after it); a row given another TAE than the rule's (a later one of its own second, or
    the later of two) is refused, not returned."""
    from store_bridge.feast_training_set import FeastJoinError, feast_training_set
    from store_bridge.training_set import expert_training_set

    repo, _ = ray_repo
    entry = repo.load_manifest().versions["v2"]
    good = [(0, 0, T0 + 10_900_000), (0, 0, T0 + 12_000_000), (1, 1, T0 + 5_600_000)]
    got = feast_training_set(feature_store, repo, labels_frame(good), entry, [])
    assert [_embedding_index(e) for e in got["embedding"]] == [0, 0, 2]  # 10.8 s, not 10.3 s
    assert [_embedding_index(e) for e in expert_training_set(
        repo, labels_frame(good), entry, [])["embedding"]] == [0, 0, 2]

    between = good + [(0, 0, T0 + 10_500_000)]  # between the two TAEs of one second
    with pytest.raises(FeastJoinError, match=(
        r"matched the row of 2026-01-05T00:00:10.800000\+00:00 of fm_tae_v2 to the label row "
        r"\{'user_id': 0, 'item_id': 0\} at 2026-01-05T00:00:10.500000\+00:00; the "
        r"point-in-time rule gives the row of 2026-01-05T00:00:10.300000\+00:00 \(1 of 4 "
        r"distinct rows differ\)\. Feast 0.67's Ray store compares times in whole seconds")):
        feast_training_set(feature_store, repo, labels_frame(between), entry, [])
    early = good + [(1, 1, T0 + 5_200_000)]  # 0.3 s before v2's TAE of (1, 1), same second
    with pytest.raises(FeastJoinError, match=r"matched the row of 2026-01-05T00:00:05.500000"
                                             r"\+00:00 .* the point-in-time rule gives no row"):
        feast_training_set(feature_store, repo, labels_frame(early), entry, [])


def test_feast_engine_on_duckdb_equals_in_memory_join(ray_repo, redis_url):
    """The default offline store through the same engine (registered views, Feast's own TTL)."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    from store_bridge.feast_training_set import feast_training_set
    from store_bridge.redis_server import feast_connection_string
    from store_bridge.training_set import expert_training_set

    repo, taes = ray_repo
    raw = yaml.safe_load((repo.path / "feature_store.yaml").read_text().replace(
        "${FOUNDEX_FEAST_REDIS}", feast_connection_string(redis_url)))
    raw["offline_store"] = {"type": "duckdb"}
    config = RepoConfig(**raw)
    config.repo_path = repo.path
    duck = FeatureStore(repo_path=str(repo.path), config=config)
    entry = repo.load_manifest().versions["v1"]
    frame = _naive(labels_frame(_label_rows(taes)))
    theirs = feast_training_set(duck, repo, frame.copy(), entry)
    ours = expert_training_set(repo, frame.copy(), entry)
    pd.testing.assert_frame_equal(theirs.drop(columns="embedding"), ours.drop(columns="embedding"))
    assert ([_embedding_index(e) for e in theirs["embedding"]]
            == [_embedding_index(e) for e in ours["embedding"]])


def test_cli_feast_engine_end_to_end(ray_session, ray_repo, tmp_path, redis_url):
    """`foundex training-set --engine feast` writes the file `--engine foundex` writes, and
    says the same one line on stdout."""
    repo, taes = ray_repo
    entities = tmp_path / "labels.parquet"
    rows = _label_rows(taes)
    _naive(labels_frame(rows)).to_parquet(entities)
    outputs, said = {}, {}
    for engine in ("feast", "foundex"):
        outputs[engine] = out = tmp_path / f"{engine}.parquet"
        r = CliRunner().invoke(app, [
            "training-set", "--expert", "e1", "--entities", str(entities), "--out", str(out),
            "--repo", str(repo.path), "--engine", engine,
        ], env={"REDIS_URL": redis_url, "FOUNDEX_REPO": None})
        assert r.exit_code == 0, (r.output, r.exception)
        said[engine] = r.stdout.replace(str(out), "OUT")
        assert r.stderr.splitlines() == [
            "note: event_timestamp has no time zone; its times are taken as UTC"
        ]
    assert said["feast"] == said["foundex"]
    assert said["feast"].startswith(f"wrote {len(rows)} rows to OUT (") and said["feast"].count("\n") == 1
    a, b = pd.read_parquet(outputs["foundex"]), pd.read_parquet(outputs["feast"])
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), b.drop(columns="embedding"))
    for x, y in zip(a["embedding"], b["embedding"], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_a_bad_engine_is_refused(ray_repo, tmp_path):
    from api.services import offline
    from api.services.context import ServiceContext
    from api.services.errors import Invalid
    from api.settings import Settings

    repo, _ = ray_repo
    entities = tmp_path / "labels.parquet"
    labels_frame([(0, 0, T0)]).to_parquet(entities)
    r = CliRunner().invoke(app, [
        "training-set", "--expert", "e1", "--entities", str(entities),
        "--out", str(tmp_path / "ts.parquet"), "--repo", str(repo.path), "--engine", "spark",
    ])
    assert r.exit_code == 2
    assert "Invalid value for '--engine'" in r.output and "'spark' is not one of" in r.output
    assert not (tmp_path / "ts.parquet").exists()

    settings = Settings()
    settings.repo = repo.path
    ctx = ServiceContext(settings, "redis://unused")
    plan = offline.plan_training_set(ctx, "e1")
    with pytest.raises(Invalid, match=r"unknown training-set engine 'spark' \(choose from: "
                                      r"foundex, feast\)"):
        offline.build_training_set(ctx, plan, labels_frame([(0, 0, T0)]), engine="spark")


def test_ray_processes_end_with_the_session(ray_session):
    """Last: the session that started Ray stops it, and with it every process Ray began
    (GCS, raylet, workers), as it does when a `foundex training-set --engine feast` ends."""
    import ray

    ray_session.close()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while _processes_with(ray_session.marker) and time.monotonic() < deadline:
        time.sleep(0.2)  # a process may take a moment to exit after its kill
    assert _processes_with(ray_session.marker) == []
