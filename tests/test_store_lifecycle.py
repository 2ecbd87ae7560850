"""FM version lifecycle on a real Redis: gc removes a retired version's rows, files, checkpoint
and view, keeps every other version's rows in the same hashes, and refuses active versions; a
version name, once used, never names another model; the same checkpoint is not published twice
unless asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store_bridge.feast_layout import entity_keys, feature_field, ts_field
from store_bridge.logging_tier import tae_table
from store_bridge.online import RedisEmbeddingStore
from store_bridge.redis_server import FEAST_ENV, feast_connection_string, redis_client
from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply
from store_bridge.versions import VersionError, gc, publish, retire

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_767_571_200_000_000
DIM = 8


def _version(v: str, status: str = "active", dim: int = DIM) -> FMVersion:
    return FMVersion(
        version=v, dim=dim, checkpoint=f"checkpoints/{v}.pt", digest=f"digest-{v}", status=status,
        training_window=("2026-01-01T00:00:00", "2026-01-02T00:00:00"), created_at="2026-01-02",
    )


def _setup(feature_repo: Path, redis_url: str, project: str):
    """Two versions, v1 and v2, with online rows sharing hashes and offline files each."""
    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", f"project: {project}"))
    repo = FeatureRepo(feature_repo)
    repo.save_manifest(Manifest(versions={"v1": _version("v1"), "v2": _version("v2")}))
    repo.checkpoints_dir.mkdir(parents=True)
    for v in ("v1", "v2"):
        (repo.checkpoints_dir / f"{v}.pt").write_bytes(b"not a real checkpoint")
    feast_apply(repo, redis_url)
    store = RedisEmbeddingStore(redis_client(redis_url), project)
    rng = np.random.default_rng(0)
    users, items = np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)  # 20 keys
    ts = np.full(len(users), T0, dtype=np.int64)
    m1 = rng.normal(size=(20, DIM)).astype(np.float32)
    m2 = rng.normal(size=(20, DIM)).astype(np.float32)
    assert store.write("v1", users, items, ts, m1) == 20
    # v2 has only the first 12 keys: the other 8 hashes hold v1 alone and must vanish.
    assert store.write("v2", users[:12], items[:12], ts[:12], m2[:12]) == 12
    for v, m in (("v1", m1), ("v2", m2)):
        day = repo.tae_dir(v) / "2026-01-05"
        day.mkdir(parents=True)
        import pyarrow.parquet as pq

        pq.write_table(tae_table(users, items, ts, m), day / "part-x-00000.parquet")
    return repo, store, users, items, m1, m2


def test_gc_removes_a_retired_version_and_keeps_the_others(feature_repo, redis_url):
    from feast import FeatureStore

    project = "gc_test"
    repo, store, users, items, m1, m2 = _setup(feature_repo, redis_url, project)
    client = redis_client(redis_url)
    keys = entity_keys(project, {"user_id": users, "item_id": items})

    with pytest.raises(VersionError, match="v1 is active; retire it first"):
        gc(repo, "v1", redis_url, pinned_by=[])
    retire(repo, "v1", redis_url, pinned_by=[])
    with pytest.raises(VersionError, match="pinned by experts a, b"):
        gc(repo, "v1", redis_url, pinned_by=["b", "a"])

    env = dict(os.environ, REDIS_URL=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "fm", "gc", "v1", "--repo", str(repo.path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "gc v1: 20 online rows, 1 offline files, checkpoint removed" in out.stdout

    # Online: no hash of the project holds v1 any more; v2's 12 rows are intact, and the
    # 8 hashes that held only v1 are gone entirely.
    f1, t1 = feature_field("fm_tae_v1", "embedding"), ts_field("fm_tae_v1")
    for k in keys:
        assert client.hget(k, f1) is None and client.hget(k, t1) is None
    assert sum(client.exists(k) for k in keys) == 12
    for u in range(5):
        sel = users == u
        got = store.read("v2", DIM, u, items[sel])
        present = [j for j, key_i in enumerate(np.flatnonzero(sel)) if key_i < 12]
        np.testing.assert_array_equal(got.matrix[present], m2[np.flatnonzero(sel)[present]])
    # Offline files, checkpoint and manifest entry are gone; v2's stay.
    assert not repo.tae_dir("v1").exists() and repo.tae_dir("v2").exists()
    assert not (repo.checkpoints_dir / "v1.pt").exists()
    assert (repo.checkpoints_dir / "v2.pt").exists()
    assert set(repo.load_manifest().versions) == {"v2"}
    assert repo.load_manifest().deleted["v1"].digest == "digest-v1"  # the tombstone
    # The view is gone from the registry; Feast still reads v2 from the shared hashes.
    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    fs = FeatureStore(repo_path=str(repo.path))
    names = {v.name for v in fs.list_feature_views()}
    assert "fm_tae_v1" not in names and "fm_tae_v2" in names
    got = fs.get_online_features(
        ["fm_tae_v2:embedding"], entity_rows=[{"user_id": int(users[0]), "item_id": int(items[0])}]
    ).to_dict()
    np.testing.assert_array_equal(np.asarray(got["embedding"][0], np.float32), m2[0])

    # gc of the remaining active version is refused by the CLI with a clear message.
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "fm", "gc", "v2", "--repo", str(repo.path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2 and "v2 is active" in out.stderr
    assert store.read("v2", DIM, 0, np.arange(4)).missing == []


def test_feast_apply_deletes_a_removed_views_rows_only(feature_repo, redis_url):
    """What gc relies on from Feast: apply without a view deletes that view's fields and
    leaves other views' fields in the same hashes."""
    project = "apply_drop"
    repo, store, users, items, m1, m2 = _setup(feature_repo, redis_url, project)
    client = redis_client(redis_url)
    keys = entity_keys(project, {"user_id": users, "item_id": items})
    manifest = repo.load_manifest()
    del manifest.versions["v1"]
    repo.save_manifest(manifest)
    feast_apply(repo, redis_url)
    f1 = feature_field("fm_tae_v1", "embedding")
    assert all(client.hget(k, f1) is None for k in keys)
    assert sum(client.exists(k) for k in keys) == 12
    got = store.read("v2", DIM, 0, np.arange(4))
    assert got.missing == []
    np.testing.assert_array_equal(got.matrix, m2[:4])


def test_delete_version_is_limited_to_its_project(feature_repo, redis_url):
    client = redis_client(redis_url)
    a, b = RedisEmbeddingStore(client, "proj_a"), RedisEmbeddingStore(client, "proj_b")
    m = np.ones((3, 4), np.float32)
    ts = np.full(3, T0, dtype=np.int64)
    a.write("v1", np.arange(3), np.arange(3), ts, m)
    b.write("v1", np.arange(3), np.arange(3), ts, m)
    assert a.delete_version("v1") == 3
    assert a.read("v1", 4, 0, np.arange(3)).missing == [0, 1, 2]
    assert b.read("v1", 4, 1, np.arange(3)).missing == [0, 2]
    assert a.delete_version("v1") == 0  # repeatable


def test_validate_pin():
    manifest = Manifest(
        versions={"v1": _version("v1", status="retired"), "v2": _version("v2", dim=64)}
    )
    manifest.check_pin("v2")
    manifest.check_pin("v2", expected_dim=64)
    with pytest.raises(ValueError, match=r"unknown FM version 'v9' \(known: v1, v2\)"):
        manifest.check_pin("v9")
    with pytest.raises(ValueError, match=r"'v1', which is retired \(active: v2\)"):
        manifest.check_pin("v1")
    with pytest.raises(ValueError, match="expects 32-d embeddings but FM version 'v2' is 64-d"):
        manifest.check_pin("v2", expected_dim=32)


def _checkpoint(path: Path, seed: int) -> Path:
    import torch

    from fm import FMConfig, FoundationModel, save_checkpoint
    from fm.testing import toy_config_kwargs

    torch.manual_seed(seed)
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=12, content_dim=3)
    return save_checkpoint(FoundationModel(cfg, torch.randn(40, 3)), path)


def test_a_version_name_is_never_reused(feature_repo, redis_url, tmp_path):
    """publish A (v1); A again is refused naming v1, then allowed as v2; retire and gc v2;
    publishing B gives v3, never a second v2."""
    from feast import FeatureStore

    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", "project: names_t"))
    repo = FeatureRepo(feature_repo)
    a, b = _checkpoint(tmp_path / "a.pt", 0), _checkpoint(tmp_path / "b.pt", 1)
    window = ("2026-01-01", "2026-01-08T00:00:00+01:00")
    v1 = publish(repo, a, redis_url, training_window=window, allow_duplicate=False)
    assert v1.version == "v1"
    assert v1.training_window == ("2026-01-01T00:00:00+00:00", "2026-01-07T23:00:00+00:00")

    env = dict(os.environ, REDIS_URL=redis_url)
    cmd = [sys.executable, "-m", "api.cli", "fm", "publish", str(a), "--train-start", window[0],
           "--train-end", window[1], "--repo", str(repo.path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {a} is already published as v1 (active, digest {v1.digest[:12]}); allow "
        'duplicates (CLI --allow-duplicate, REST "allow_duplicate": true) to publish it again '
        "under a new version"
    )
    assert set(repo.load_manifest().versions) == {"v1"}
    out = subprocess.run([*cmd, "--allow-duplicate"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"published v2 (dim {v1.dim}, digest {v1.digest[:12]})"

    retire(repo, "v2", redis_url, pinned_by=[])
    gc(repo, "v2", redis_url, pinned_by=[])
    manifest = repo.load_manifest()
    assert set(manifest.versions) == {"v1"} and set(manifest.deleted) == {"v2"}
    assert manifest.deleted["v2"].digest == v1.digest
    with pytest.raises(VersionError, match=r"^FM version v2 was deleted by gc on \d{4}-"):
        retire(repo, "v2", redis_url, pinned_by=[])

    v3 = publish(repo, b, redis_url, training_window=window)
    assert v3.version == "v3" and v3.digest != v1.digest
    assert set(repo.load_manifest().versions) == {"v1", "v3"}
    assert not (repo.checkpoints_dir / "v2.pt").exists()
    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    names = {v.name for v in FeatureStore(repo_path=str(repo.path)).list_feature_views()}
    assert {n for n in names if n.startswith("fm_tae_")} == {"fm_tae_v1", "fm_tae_v3"}
    listed = subprocess.run(
        [sys.executable, "-m", "api.cli", "fm", "list", "--repo", str(repo.path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    ).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [
        ["v1", "active"], ["v3", "active"], ["v2", "deleted"]
    ]
