"""Point-in-time joins: equal to a brute-force oracle and to Feast's get_historical_features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store_bridge.logging_tier import tae_table
from store_bridge.training_set import point_in_time_join

T0 = 1_767_571_200_000_000  # 2026-01-05 in microseconds


def write_taes(dir_, rows: list[tuple[int, int, int]], dim: int = 3) -> np.ndarray:
    """rows: (user, item, ts_us). Embedding i is [i, i, i] so the oracle can name it."""
    import pyarrow.parquet as pq

    u, i, t = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    m = np.repeat(np.arange(len(rows), dtype=np.float32)[:, None], dim, axis=1)
    (dir_ / "2026-01-05").mkdir(parents=True, exist_ok=True)
    pq.write_table(tae_table(u, i, t, m), dir_ / "2026-01-05" / "part-0.parquet")
    return m


def oracle(taes: list[tuple[int, int, int]], labels: list[tuple[int, int, int]], ttl_us: int):
    """For each label row: index of the latest TAE of that (user, item) with ts <= row ts and
    row ts - ts <= ttl; None if there is none."""
    out = []
    for u, i, t in labels:
        best = None
        for k, (tu, ti, tt) in enumerate(taes):
            if tu == u and ti == i and tt <= t and (best is None or tt > taes[best][2]):
                best = k
        if best is not None and t - taes[best][2] > ttl_us:
            best = None
        out.append(best)
    return out


def labels_frame(labels):
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in labels],
            "item_id": [r[1] for r in labels],
            "event_timestamp": pd.to_datetime([r[2] for r in labels], unit="us", utc=True),
            "click": np.arange(len(labels), dtype=np.float32),
        }
    )


key = st.tuples(st.integers(0, 2), st.integers(0, 2))
offset = st.integers(0, 50) .map(lambda s: T0 + s * 1_000_000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    taes=st.lists(st.tuples(key, offset), min_size=1, max_size=25, unique_by=lambda r: r),
    labels=st.lists(st.tuples(key, offset), min_size=1, max_size=25),
    ttl_s=st.sampled_from([1, 5, 20, 10_000]),
)
def test_point_in_time_equals_oracle(tmp_path_factory, taes, labels, ttl_s):
    taes = [(u, i, t) for (u, i), t in taes]
    labels = [(u, i, t) for (u, i), t in labels]
    d = tmp_path_factory.mktemp("tae")
    write_taes(d, taes)
    out = point_in_time_join(labels_frame(labels), tae_glob=d / "*" / "*.parquet", ttl_seconds=ttl_s)
    expected = oracle(taes, labels, ttl_s * 1_000_000)
    assert len(out) == len(labels)
    np.testing.assert_array_equal(out["click"], np.arange(len(labels)))  # order kept
    for got, want in zip(out["embedding"], expected, strict=True):
        if want is None:
            assert got is None
        else:
            assert got is not None and got[0] == want


def test_no_embedding_later_than_the_label_row(tmp_path):
    taes = [(1, 1, T0 + 10), (1, 1, T0 + 30)]
    write_taes(tmp_path, taes)
    labels = [(1, 1, T0 + 9), (1, 1, T0 + 10), (1, 1, T0 + 29), (1, 1, T0 + 30), (1, 1, T0 + 99)]
    out = point_in_time_join(labels_frame(labels), tae_glob=tmp_path / "*" / "*.parquet", ttl_seconds=3600)
    got = [None if e is None else int(e[0]) for e in out["embedding"]]
    assert got == [None, 0, 0, 1, 1]


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ValueError, match="item_id"):
        point_in_time_join(
            pd.DataFrame({"user_id": [1], "event_timestamp": [pd.Timestamp.now(tz="UTC")]}),
            tae_glob=tmp_path / "*" / "*.parquet",
            ttl_seconds=10,
        )


def test_equals_feast_get_historical_features(tmp_path, redis_url, feature_repo):
    """Same inputs through Feast's own offline join (DuckDB store) give the same embeddings."""
    import os

    from feast import FeatureStore

    from store_bridge.redis_server import FEAST_ENV, feast_connection_string
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply

    repo = FeatureRepo(feature_repo)
    ttl_s = 20
    repo.save_manifest(
        Manifest(
            versions={
                "v1": FMVersion(
                    version="v1", dim=3, checkpoint="x.pt", digest="d", ttl_seconds=ttl_s,
                    training_window=("2026-01-01", "2026-01-02"), created_at="2026-01-02",
                )
            }
        )
    )
    feast_apply(repo, redis_url)
    rng = np.random.default_rng(3)
    taes = sorted({(int(rng.integers(3)), int(rng.integers(3)), T0 + int(rng.integers(60)) * 1_000_000) for _ in range(40)})
    labels = [(int(rng.integers(4)), int(rng.integers(3)), T0 + int(rng.integers(80)) * 1_000_000) for _ in range(60)]
    labels += [(u, i, t) for u, i, t in taes[:5]]  # equal timestamps
    labels += [(u, i, t + ttl_s * 1_000_000) for u, i, t in taes[5:10]]  # exactly at the TTL edge
    write_taes(repo.tae_dir("v1"), taes)
    frame = labels_frame(labels)
    ours = point_in_time_join(frame, tae_glob=repo.tae_dir("v1") / "*" / "*.parquet", ttl_seconds=ttl_s)

    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    fs = FeatureStore(repo_path=str(feature_repo))
    theirs = fs.get_historical_features(entity_df=frame, features=["fm_tae_v1:embedding"]).to_df()
    theirs = theirs.sort_values("click").reset_index(drop=True)
    assert len(theirs) == len(ours)
    for a, b in zip(ours["embedding"], theirs["embedding"], strict=True):
        if a is None:
            assert b is None or (np.isscalar(b) and pd.isna(b)) or len(b) == 0
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sum(e is not None for e in ours["embedding"]) > 10  # the comparison is not vacuous


# Two versions in one repo, each with its own TTL, compared with Feast example by example.
TTL_S = {"v1": 5, "v2": 20}


@pytest.fixture(scope="module")
def two_version_repo(tmp_path_factory, redis_url):
    import os

    from conftest import copy_feature_repo
    from feast import FeatureStore

    from store_bridge.redis_server import FEAST_ENV, feast_connection_string
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply

    repo = FeatureRepo(copy_feature_repo(tmp_path_factory.mktemp("pit") / "feature_repo"))
    repo.save_manifest(
        Manifest(
            versions={
                v: FMVersion(
                    version=v, dim=3, checkpoint=f"{v}.pt", digest="d", ttl_seconds=ttl,
                    training_window=("2026-01-01", "2026-01-02"), created_at="2026-01-02",
                )
                for v, ttl in TTL_S.items()
            }
        )
    )
    feast_apply(repo, redis_url)
    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    return repo, FeatureStore(repo_path=str(repo.path))


tae_rows = st.lists(st.tuples(key, offset), min_size=1, max_size=15, unique_by=lambda r: r)
# Label rows: free ones, and ones placed on a TAE's time plus an edge (equal time, the TTL of
# either version exactly, one microsecond past it, one microsecond before the TAE).
edges = st.sampled_from(
    [0, -1, TTL_S["v1"] * 1_000_000, TTL_S["v1"] * 1_000_000 + 1,
     TTL_S["v2"] * 1_000_000, TTL_S["v2"] * 1_000_000 + 1]
)


@pytest.mark.filterwarnings("ignore:fetch_arrow_table")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    taes=st.fixed_dictionaries({"v1": tae_rows, "v2": tae_rows}),
    free_labels=st.lists(st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 2)), offset),
                         max_size=15),
    placed=st.lists(st.tuples(st.integers(0, 100), edges), min_size=1, max_size=15),
)
def test_two_versions_equal_feast_and_oracle(two_version_repo, taes, free_labels, placed):
    import shutil

    repo, fs = two_version_repo
    taes = {v: [(u, i, t) for (u, i), t in rows] for v, rows in taes.items()}
    labels = [(u, i, t) for (u, i), t in free_labels]
    all_taes = taes["v1"] + taes["v2"]
    labels += [(all_taes[k % len(all_taes)][0], all_taes[k % len(all_taes)][1],
                all_taes[k % len(all_taes)][2] + d) for k, d in placed]
    for v, rows in taes.items():
        shutil.rmtree(repo.tae_dir(v), ignore_errors=True)
        write_taes(repo.tae_dir(v), rows)
    frame = labels_frame(labels)
    theirs = fs.get_historical_features(
        entity_df=frame, features=["fm_tae_v1:embedding", "fm_tae_v2:embedding"],
        full_feature_names=True,
    ).to_df()
    theirs = theirs.sort_values("click").reset_index(drop=True)
    assert len(theirs) == len(labels)
    for v, rows in taes.items():
        ours = point_in_time_join(
            frame, tae_glob=repo.tae_dir(v) / "*" / "*.parquet", ttl_seconds=TTL_S[v]
        )
        want = oracle(rows, labels, TTL_S[v] * 1_000_000)
        for n, (a, b, w) in enumerate(
            zip(ours["embedding"], theirs[f"fm_tae_{v}__embedding"], want, strict=True)
        ):
            b = None if b is None or (np.isscalar(b) and pd.isna(b)) or len(b) == 0 else b
            where = f"{v} label {labels[n]}"
            if w is None:
                assert a is None, where
                assert b is None, where + " (feast)"
            else:
                assert a is not None and a[0] == w, where
                assert b is not None and np.asarray(b)[0] == w, where + " (feast)"


# Key values from a few anchors spread over int64, so that both the lookup-table and the
# sorted-search ranking of key columns and the time ranks (times too far apart for offsets)
# are exercised, and keys still meet. A tiny key bound also forces the re-ranking of key
# tuples that a real table needs only past ~2^31 distinct values per column.
anchors = st.sampled_from([-(2**62), -7, 0, 3, 2**40, 2**62])


@settings(max_examples=150, deadline=None)
@given(
    table=st.lists(
        st.tuples(st.tuples(anchors, anchors, anchors), st.sampled_from([-(2**61), -1, 0, 5, 2**61])),
        min_size=1, max_size=30,
    ),
    rows=st.lists(
        st.tuples(st.tuples(anchors, anchors, anchors), st.sampled_from([-(2**62), -1, 0, 4, 5, 2**62])),
        min_size=1, max_size=30,
    ),
    n_cols=st.integers(1, 3),
    key_bound=st.sampled_from([2**62, 4]),
)
def test_asof_indices_equals_brute_force(table, rows, n_cols, key_bound):
    from unittest import mock

    from store_bridge import training_set

    t_keys = [np.array([k[c] for k, _ in table], dtype=np.int64) for c in range(n_cols)]
    r_keys = [np.array([k[c] for k, _ in rows], dtype=np.int64) for c in range(n_cols)]
    t_ts = np.array([t for _, t in table], dtype=np.int64)
    r_ts = np.array([t for _, t in rows], dtype=np.int64)
    with mock.patch.object(training_set, "_KEY_BOUND", key_bound):
        got = training_set.asof_indices(t_keys, t_ts, r_keys, r_ts)
    for j, (key, t) in enumerate(rows):
        best = -1
        for i, (tkey, tt) in enumerate(table):
            # Latest time <= the row's; on equal keys and time the later table row wins.
            if tkey[:n_cols] == key[:n_cols] and tt <= t and (best < 0 or tt >= table[best][1]):
                best = i
        assert got[j] == best, (j, key, t)


def test_taes_spread_over_many_files_join_as_one(tmp_path):
    """The same TAE rows in one file or spread over 40 files on several days give the same
    training set (rows are grouped by file before the embeddings are gathered)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    n = 400
    u, i = rng.integers(0, 5, n), rng.integers(0, 8, n)
    t = T0 + rng.choice(10**9, n, replace=False) * 1_000
    m = rng.normal(size=(n, 4)).astype(np.float32)
    one, many = tmp_path / "one", tmp_path / "many"
    (one / "2026-01-05").mkdir(parents=True)
    pq.write_table(tae_table(u, i, t, m), one / "2026-01-05" / "part-0.parquet")
    for k, part in enumerate(np.array_split(rng.permutation(n), 40)):
        day = many / f"2026-01-0{5 + k % 3}"
        day.mkdir(parents=True, exist_ok=True)
        pq.write_table(tae_table(u[part], i[part], t[part], m[part]), day / f"part-{k}.parquet")
    labels = [(int(a), int(b), int(c)) for a, b, c in zip(
        rng.integers(0, 6, 3000), rng.integers(0, 9, 3000), T0 + rng.integers(0, 10**12, 3000), strict=True)]
    a = point_in_time_join(labels_frame(labels), tae_glob=one / "*" / "*.parquet", ttl_seconds=600)
    b = point_in_time_join(labels_frame(labels), tae_glob=many / "*" / "*.parquet", ttl_seconds=600)
    hits = 0
    for x, y in zip(a["embedding"], b["embedding"], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
            hits += 1
    assert 0 < hits < len(labels)
