"""foundex's bulk encoders produce exactly Feast's Redis bytes, and read what Feast writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import FloatList, Value

from store_bridge.feast_layout import (
    decode_float_lists,
    encode_float_lists,
    entity_keys,
    feature_field,
)


def test_entity_keys_match_feast():
    users = np.array([0, 7, -3, 2**40], dtype=np.int64)
    items = np.array([5, 0, 11, 3], dtype=np.int64)
    ours = entity_keys("foundex", {"user_id": users, "item_id": items})
    for u, i, key in zip(users, items, ours, strict=True):
        ek = EntityKey(
            join_keys=["user_id", "item_id"],
            entity_values=[Value(int64_val=int(u)), Value(int64_val=int(i))],
        )
        assert key == serialize_entity_key(ek, entity_key_serialization_version=3) + b"foundex"


def test_feature_field_matches_feast():
    assert feature_field("fm_tae_v1", "embedding") == _mmh3("fm_tae_v1:embedding")


@pytest.mark.parametrize("dim", [1, 16, 64, 128, 300])
def test_float_lists_round_trip_and_match_protobuf(dim):
    m = np.random.default_rng(dim).normal(size=(5, dim)).astype(np.float32)
    encoded = encode_float_lists(m)
    for row, raw in zip(m, encoded, strict=True):
        assert raw == Value(float_list_val=FloatList(val=row.tolist())).SerializeToString()
    values = [encoded[0], None, encoded[2], encoded[3], None]
    rows = decode_float_lists(values, dim)
    assert rows.missing == [1, 4]
    assert rows.undecodable == []
    np.testing.assert_array_equal(rows.matrix[[0, 2, 3]], m[[0, 2, 3]])
    assert np.isnan(rows.matrix[[1, 4]]).all()


def test_decode_reports_other_dimension_as_undecodable():
    # Stored rows of another width are served as missing (and counted), never raised.
    raw = encode_float_lists(np.zeros((2, 8), dtype=np.float32))
    rows = decode_float_lists(raw, 16)
    assert rows.missing == [0, 1]
    assert rows.undecodable == [0, 1]
    assert rows.matrix.shape == (2, 16) and np.isnan(rows.matrix).all()


def test_online_store_interoperates_with_feast(redis_url, feature_repo):
    """Rows written by foundex are read by FeatureStore, and the reverse."""
    from feast import FeatureStore

    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import FEAST_ENV, feast_connection_string, redis_client
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply

    repo = FeatureRepo(feature_repo)
    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", "project: layout_t"))
    repo.save_manifest(
        Manifest(
            versions={
                "v1": FMVersion(
                    version="v1", dim=8, checkpoint="x.pt", digest="d",
                    training_window=("2026-01-01", "2026-01-02"), created_at="2026-01-02",
                )
            }
        )
    )
    feast_apply(repo, redis_url)
    store = RedisEmbeddingStore(redis_client(redis_url), "layout_t")
    m = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    ts = np.full(3, 1_767_571_200_000_000, dtype=np.int64)
    store.write("v1", np.array([1, 1, 2]), np.array([10, 11, 10]), ts, m)

    import os

    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    fs = FeatureStore(repo_path=str(feature_repo))
    got = fs.get_online_features(
        ["fm_tae_v1:embedding"],
        entity_rows=[{"user_id": 1, "item_id": 11}, {"user_id": 9, "item_id": 9}],
    ).to_dict()
    np.testing.assert_allclose(got["embedding"][0], m[1])
    assert got["embedding"][1] is None

    fs.write_to_online_store(
        "fm_tae_v1",
        pd.DataFrame(
            {
                "user_id": [5],
                "item_id": [6],
                "embedding": [np.arange(8, dtype=np.float32).tolist()],
                "event_timestamp": [pd.Timestamp("2026-01-03", tz="UTC")],
            }
        ),
    )
    rows = store.read("v1", 8, 5, np.array([6, 7]))
    np.testing.assert_array_equal(rows.matrix[0], np.arange(8, dtype=np.float32))
    assert rows.missing == [1]

    # An older write never rolls a newer stored value back.
    older = np.full(1, 1_767_000_000_000_000, dtype=np.int64)
    assert store.write("v1", np.array([1]), np.array([10]), older, np.zeros((1, 8), np.float32)) == 0
    np.testing.assert_array_equal(store.read("v1", 8, 1, np.array([10])).matrix[0], m[0])


def test_feast_apply_on_a_fresh_repo(feature_repo, redis_url):
    """`feast apply` by hand on the repo as cloned (no data yet) succeeds and registers the
    fixed objects; there are no FM versions until one is published."""
    import os
    import subprocess

    from store_bridge.redis_server import FEAST_ENV, feast_connection_string
    from tests.conftest import feast_cli

    env = dict(os.environ, **{FEAST_ENV: feast_connection_string(redis_url)})
    proc = subprocess.run([feast_cli(), "apply"], cwd=feature_repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = subprocess.run(
        [feast_cli(), "feature-views", "list"], cwd=feature_repo, env=env, capture_output=True, text=True
    )
    assert "item_features" in listed.stdout and "user_history" in listed.stdout
    assert "fm_tae_" not in listed.stdout


def test_bulk_timestamps_match_protobuf():
    from store_bridge.feast_layout import encode_timestamp_us, encode_timestamps_us

    rng = np.random.default_rng(5)
    edges = [0, 1, 999_999, 1_000_000, 127_000_000, 128_000_000, 1_767_571_200_000_001,
             2**35 * 10**6 - 1, 2**35 * 10**6, -1, -1_500_000]
    ts = np.concatenate([rng.integers(0, 2**36 * 10**6, 5000), edges])
    assert encode_timestamps_us(ts) == [encode_timestamp_us(int(t)) for t in ts]
    assert encode_timestamps_us(np.array(edges[:-2])) == [encode_timestamp_us(t) for t in edges[:-2]]


def test_feast_connection_string():
    from store_bridge.redis_server import feast_connection_string

    assert feast_connection_string("redis://localhost:6390/2") == "localhost:6390,db=2"
    assert feast_connection_string("rediss://:s3cret@h:1/0", timeout=0.1) == (
        "h:1,db=0,password=s3cret,ssl=true,socket_timeout=0.1,socket_connect_timeout=0.1"
    )
    with pytest.raises(ValueError, match="redis://"):
        feast_connection_string("http://x")


def test_scripted_write_keeps_the_latest_per_key(redis_url):
    """One batch on a single Redis mixes keys stored newer, stored older, new, and repeated;
    each key ends with its latest value and Feast's serialized event time."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from store_bridge.feast_layout import encode_timestamp_us, ts_field
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import redis_client

    store = RedisEmbeddingStore(redis_client(redis_url), "cas_t")
    rng = np.random.default_rng(3)
    dim, n = 16, 300
    users, items = np.zeros(n, np.int64), np.arange(n, dtype=np.int64)
    # Times with and without a sub-second part and of varied varint lengths.
    base = np.array([1_767_571_200_000_000, 1_000_000, 1, 1_767_571_200_123_456])
    first_ts = base[np.arange(n) % 4] + rng.integers(0, 10**9, n) * 1_000_000
    first = rng.normal(size=(n, dim)).astype(np.float32)
    assert store.write("v1", users, items, first_ts, first) == n

    # Keys 0..99: the stored row is newer; 100..199: older; 200..299: never stored. Every key
    # of the second batch comes twice, the later copy last, so only one of each may be kept.
    second_ts = first_ts.copy()
    second_ts[:100] -= 1
    second_ts[100:200] += 1
    items2 = np.concatenate([items + 1000 * (items >= 200), items + 1000 * (items >= 200)])
    ts2 = np.concatenate([second_ts - 5, second_ts])
    second = rng.normal(size=(2 * n, dim)).astype(np.float32)
    assert store.write("v1", np.zeros(2 * n, np.int64), items2, ts2, second) == 200

    got = store.read("v1", dim, 0, items)
    np.testing.assert_array_equal(got.matrix[:100], first[:100])
    np.testing.assert_array_equal(got.matrix[100:200], second[n + 100 : n + 200])
    np.testing.assert_array_equal(store.read("v1", dim, 0, items[200:] + 1000).matrix, second[n + 200 :])
    tfield = ts_field("fm_tae_v1")
    keys = entity_keys("cas_t", {"user_id": np.zeros(3, np.int64), "item_id": np.array([0, 150, 1250])})
    for key, want in zip(keys, [first_ts[0], second_ts[150], second_ts[250]], strict=True):
        raw = store.client.hget(key, tfield)
        assert raw == encode_timestamp_us(int(want))
        t = Timestamp()
        t.ParseFromString(raw)
        assert t.seconds * 1_000_000 + t.nanos // 1000 == want
    store.delete_version("v1")
