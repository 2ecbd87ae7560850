"""The service layer on its own (no HTTP): one context, use-cases returning result objects or
raising domain errors. Real Redis (conftest's server), real Feast config, a scratch repo."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from api.json_rows import lookup_json
from api.services import lifecycle
from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid, NotFound
from api.services.lookup import lookup
from api.settings import Settings
from experts import ExpertConfig, save_expert_config
from store_bridge.redis_server import FEAST_ENV, feast_connection_string
from store_bridge.repo import FeatureRepo, FMVersion, Manifest

DIM = 4


@pytest.fixture
def ctx(feature_repo, redis_url, tmp_path):
    """A repo with v1 (4-d, no checkpoint: read-through has nothing to compute with), rows for
    user 7 x items 1..3 in Redis, and experts pinning v1 and v9 (which does not exist)."""
    repo = FeatureRepo(feature_repo)
    yaml = repo.path / "feature_store.yaml"  # a project of its own: no clash with other tests
    yaml.write_text(yaml.read_text().replace("project: foundex", f"project: svc_{tmp_path.name}"))
    entry = FMVersion(version="v1", dim=DIM, checkpoint="checkpoints/v1.pt", digest="0" * 64,
                      training_window=("2026-01-01", "2026-01-02"), created_at="2026-01-02")
    repo.save_manifest(Manifest(versions={"v1": entry}))
    for name, pin in (("feed_v1", "v1"), ("feed_v9", "v9")):
        save_expert_config(ExpertConfig(name=name, surface="feed", tasks=["click"],
                                        fm_version=pin), repo.experts_dir)
    context = ServiceContext(Settings(repo=repo.path, redis_url=redis_url, max_candidates=10),
                             redis_url)
    rows = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM) / 7
    context.store.write("v1", np.full(3, 7), np.array([1, 2, 3]),
                        np.full(3, 1_767_225_600_000_000), rows)
    yield context, rows
    context.close()


def test_lookup_returns_stored_rows_missing_ones_and_their_counts(ctx):
    context, rows = ctx
    out = lookup(context, 7, [3, 99, 1], fm_version="v1")
    assert out.version.version == "v1" and out.missing == [1] and out.computed == []
    np.testing.assert_array_equal(out.matrix[[0, 2]], rows[[2, 0]])
    assert np.isnan(out.matrix[1]).all()
    assert (out.stats.stored, out.stats.computed, out.stats.missing) == (2, 0, 1)
    by_expert = lookup(context, 7, [2], expert="feed_v1")
    np.testing.assert_array_equal(by_expert.matrix, rows[[1]])


def test_lookup_raises_domain_errors(ctx):
    context, _ = ctx
    with pytest.raises(NotFound, match="unknown FM version 'v5'"):
        lookup(context, 7, [1], fm_version="v5")
    with pytest.raises(NotFound, match="unknown expert 'nobody'"):
        lookup(context, 7, [1], expert="nobody")
    with pytest.raises(Conflict, match="expert 'feed_v9' pins unknown FM version 'v9'"):
        lookup(context, 7, [1], expert="feed_v9")
    with pytest.raises(Invalid, match="item_ids has 11 entries; at most 10"):
        lookup(context, 7, list(range(11)), fm_version="v1")


def test_pinned_by_and_retire_refusal_are_one_service_call(ctx):
    context, _ = ctx
    assert context.pinned_by("v1") == ["feed_v1"]
    listing = lifecycle.list_versions(context)
    assert [(v.entry.version, v.pinned_by) for v in listing.versions] == [("v1", ["feed_v1"])]
    with pytest.raises(Conflict, match="pinned by experts feed_v1; retry with force"):
        lifecycle.retire(context, "v1", force_hint="retry with force")
    with pytest.raises(NotFound, match="unknown FM version 'v3'"):
        lifecycle.retire(context, "v3")
    assert context.repo.load_manifest().versions["v1"].status == "active"


def test_feature_store_gets_the_connection_without_touching_the_environment(ctx, monkeypatch):
    context, _ = ctx
    monkeypatch.delenv(FEAST_ENV, raising=False)
    fs = context.feature_store
    want = feast_connection_string(context.redis_url, timeout=context.redis_timeout_s)
    assert fs.config.online_store.connection_string == want
    assert FEAST_ENV not in os.environ
    assert fs.project == context.repo.project


def test_lookup_json_keeps_nulls_keys_and_float32_values():
    matrix = np.array([[0.1, -0.0, 3e38], [np.nan] * 3, [1e-45, 2.5, -7.25],
                       [np.nan] * 3], dtype=np.float32)
    body = json.loads(lookup_json("v2", 3, matrix, [1, 3], [2]))
    assert list(body) == ["fm_version", "dim", "embeddings", "missing", "computed"]
    assert body["fm_version"] == "v2" and body["dim"] == 3
    assert body["missing"] == [1, 3] and body["computed"] == [2]
    assert body["embeddings"][1] is None and body["embeddings"][3] is None
    got = np.asarray([body["embeddings"][0], body["embeddings"][2]], dtype=np.float32)
    np.testing.assert_array_equal(got, matrix[[0, 2]])
    assert np.signbit(got[0, 1])  # -0.0 stays negative zero
