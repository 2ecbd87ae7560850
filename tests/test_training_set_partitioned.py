"""The bounded (hash-partitioned) training-set path: the rows of the in-memory join and of the
point-in-time oracle whatever the partition count; output that appears whole or not at all;
the automatic choice of path; the in-memory path's errors for bad label rows; the scale bench
end to end at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_training_set import T0, labels_frame, oracle

from store_bridge.logging_tier import tae_table
from store_bridge.training_set import point_in_time_join
from store_bridge.training_set_partitioned import (
    POSITION,
    build_training_set_partitioned,
    choose_path,
    estimate_in_memory_bytes,
)

ROOT = Path(__file__).resolve().parent.parent


def write_tae_files(dir_: Path, rows: list[tuple[int, int, int]], n_files: int, dim: int = 3) -> None:
    """rows (user, item, ts_us) in file order, split over `n_files` files whose sorted paths
    keep that order; embedding k is [k, k, ...] so a row names its TAE."""
    u, i, t = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    m = np.repeat(np.arange(len(rows), dtype=np.float32)[:, None], dim, axis=1)
    for k, part in enumerate(np.array_split(np.arange(len(rows)), n_files)):
        day = dir_ / f"2026-01-{5 + k // 2:02d}"
        day.mkdir(parents=True, exist_ok=True)
        pq.write_table(tae_table(u[part], i[part], t[part], m[part]), day / f"part-{k % 2}.parquet")


def oracle_last_wins(taes, labels, ttl_us):
    """`oracle` for TAE lists with repeated (user, item, time): the last repeat wins."""
    last = {row: k for k, row in enumerate(taes)}
    unique = sorted(last, key=last.get)
    return [None if g is None else last[unique[g]] for g in oracle(unique, labels, ttl_us)]


def write_labels(path: Path, frame: pd.DataFrame) -> Path:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


def read_output(out_dir: Path) -> pd.DataFrame:
    """The bounded output in input order (sorted on label_row)."""
    frame = pq.read_table(out_dir).to_pandas()
    return frame.sort_values(POSITION).reset_index(drop=True)


def assert_same_rows(ours: pd.DataFrame, mem: pd.DataFrame) -> None:
    """The bounded rows equal the in-memory frame: same columns (plus label_row), dtypes and
    values; embeddings equal or both missing."""
    assert list(ours.columns) == [*mem.columns, POSITION]
    np.testing.assert_array_equal(ours[POSITION], np.arange(len(mem)))
    for c in mem.columns:
        if c == "embedding":
            continue
        assert ours[c].dtype == mem[c].dtype, c
        pd.testing.assert_series_equal(ours[c], mem[c], check_names=False)
    if "embedding" in mem.columns:
        for a, b in zip(ours["embedding"], mem["embedding"], strict=True):
            assert (a is None) == (b is None)
            if b is not None:
                assert a.dtype == np.float32
                np.testing.assert_array_equal(a, b)


key = st.tuples(st.integers(0, 3), st.integers(0, 2))
offset = st.integers(0, 40).map(lambda s: T0 + s * 1_000_000)
# Few TAE times, so that equal (user, item, time) rows in different files are common.
tae_offset = st.integers(0, 6).map(lambda s: T0 + s * 3_000_000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    taes=st.lists(st.tuples(key, tae_offset), min_size=1, max_size=30),  # ties across files
    labels=st.lists(st.tuples(key, offset), min_size=1, max_size=30),
    ttl_s=st.sampled_from([None, 1, 5, 20]),
    n_files=st.integers(1, 4),
    partitions=st.sampled_from([1, 2, 5, 16]),
)
def test_bounded_equals_oracle_and_in_memory(
    tmp_path_factory, taes, labels, ttl_s, n_files, partitions
):
    taes = [(u, i, t) for (u, i), t in taes]
    labels = [(u, i, t) for (u, i), t in labels]
    d = tmp_path_factory.mktemp("b")
    write_tae_files(d / "tae", taes, min(n_files, len(taes)))
    frame = labels_frame(labels)
    glob = d / "tae" / "*" / "*.parquet"
    result = build_training_set_partitioned(
        write_labels(d / "labels.parquet", frame), d / "out", tae_glob=glob, ttl_seconds=ttl_s,
        partitions=partitions, label_batch_rows=7,
    )
    ours = read_output(d / "out")
    mem = point_in_time_join(frame, tae_glob=glob, ttl_seconds=ttl_s)
    assert_same_rows(ours, mem)
    want = oracle_last_wins(taes, labels, (ttl_s or 10**9) * 1_000_000)
    got = [None if e is None else int(e[0]) for e in ours["embedding"]]
    assert got == want
    assert result.rows == len(labels) and result.partitions == partitions
    assert result.rows_without_embedding == sum(w is None for w in want)
    assert [p.name for p in result.files] == sorted(p.name for p in (d / "out").iterdir())


def test_ties_across_files_go_to_the_last_file(tmp_path):
    """Equal (user, item, time) in three files: the row of the last file wins, in every
    bucket layout, as in memory."""
    taes = [(1, 1, T0), (2, 2, T0), (1, 1, T0), (2, 2, T0), (1, 1, T0), (1, 1, T0 + 5)]
    write_tae_files(tmp_path / "tae", taes, 3)
    rows = [(1, 1, T0), (1, 1, T0 + 4), (2, 2, T0 + 1), (1, 1, T0 + 5)]
    labels = write_labels(tmp_path / "labels.parquet", labels_frame(rows))
    glob = tmp_path / "tae" / "*" / "*.parquet"
    for p in (1, 2, 7):
        build_training_set_partitioned(
            labels, tmp_path / f"out{p}", tae_glob=glob, ttl_seconds=None, partitions=p
        )
        got = [int(e[0]) for e in read_output(tmp_path / f"out{p}")["embedding"]]
        assert got == [4, 4, 3, 5]


def test_item_features_and_replaced_columns_as_in_memory(tmp_path):
    """Item features as of the row's time (float64 once some row has no item row, the
    catalogue's own dtypes otherwise), and label columns named like the joined ones replaced
    in place, as point_in_time_join does."""
    items = pd.DataFrame({
        "item_id": [0, 1, 1, 2],
        "category": np.array([5, 6, 7, 8], dtype=np.int64),
        "quality": np.array([0.5, 0.25, 0.75, 1.0], dtype=np.float32),
        "event_timestamp": pd.to_datetime([T0, T0, T0 + 10_000_000, T0 + 50_000_000], unit="us", utc=True),
    })
    write_labels(tmp_path / "items.parquet", items)
    write_tae_files(tmp_path / "tae", [(1, 0, T0), (1, 1, T0 + 5_000_000), (2, 2, T0)], 2)
    glob = tmp_path / "tae" / "*" / "*.parquet"
    for name, rows in {
        "all_present": [(1, 0, T0 + 1), (1, 1, T0 + 20_000_000), (2, 1, T0 + 3)],
        "some_missing": [(1, 0, T0 + 1), (1, 1, T0 + 20_000_000), (2, 2, T0 + 3), (3, 9, T0)],
    }.items():
        frame = labels_frame(rows)
        frame.insert(1, "category", -1.0)  # replaced by the join, in place
        frame["embedding"] = "stale"  # replaced too
        labels = write_labels(tmp_path / f"{name}.parquet", frame)
        build_training_set_partitioned(
            labels, tmp_path / name, tae_glob=glob, ttl_seconds=None,
            items_path=tmp_path / "items.parquet", partitions=3,
        )
        mem = point_in_time_join(
            frame, tae_glob=glob, ttl_seconds=None, items_path=tmp_path / "items.parquet"
        )
        ours = read_output(tmp_path / name)
        assert_same_rows(ours, mem)
        assert ours["category"].dtype == (np.float64 if name == "some_missing" else np.int64)
    assert ours["quality"][:2].tolist() == [0.5, 0.75] and ours["quality"][2:].isna().all()


def test_tiny_budget_many_buckets_keys_meet(tmp_path):
    """A tiny per-bucket budget gives hundreds of buckets; every (user, item) key's label rows
    land in one part file, and the rows are still the in-memory rows."""
    rng = np.random.default_rng(4)
    taes = [(int(u), int(i), T0 + int(t)) for u, i, t in zip(
        rng.integers(0, 30, 600), rng.integers(0, 20, 600), rng.integers(0, 10**8, 600), strict=True)]
    labels = [(int(u), int(i), T0 + int(t)) for u, i, t in zip(
        rng.integers(0, 32, 3000), rng.integers(0, 20, 3000), rng.integers(0, 2 * 10**8, 3000),
        strict=True)]
    write_tae_files(tmp_path / "tae", taes, 3, dim=8)
    frame = labels_frame(labels)
    glob = tmp_path / "tae" / "*" / "*.parquet"
    result = build_training_set_partitioned(
        write_labels(tmp_path / "labels.parquet", frame), tmp_path / "out", tae_glob=glob,
        ttl_seconds=60, bucket_bytes=2048, label_batch_rows=500,
    )
    assert result.partitions > 100 and len(result.files) > 100
    homes: dict[tuple[int, int], set[str]] = {}
    for f in result.files:
        t = pq.read_table(f, columns=["user_id", "item_id"])
        for u, i in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True):
            homes.setdefault((u, i), set()).add(f.name)
    assert max(len(v) for v in homes.values()) == 1
    mem = point_in_time_join(frame, tae_glob=glob, ttl_seconds=60)
    assert_same_rows(read_output(tmp_path / "out"), mem)
    assert 0 < result.rows_without_embedding < len(labels)


def test_no_offline_files_no_glob_and_no_label_rows(tmp_path):
    frame = labels_frame([(1, 1, T0), (2, 2, T0 + 5)])
    labels = write_labels(tmp_path / "labels.parquet", frame)
    (tmp_path / "empty").mkdir()
    r = build_training_set_partitioned(
        labels, tmp_path / "a", tae_glob=tmp_path / "empty" / "*" / "*.parquet", ttl_seconds=10
    )
    assert r.rows_without_embedding == 2 and r.dim is None
    assert read_output(tmp_path / "a")["embedding"].isna().all()
    r = build_training_set_partitioned(labels, tmp_path / "b", tae_glob=None, ttl_seconds=None)
    assert r.rows_without_embedding is None
    assert "embedding" not in pq.read_schema(r.files[0]).names
    write_tae_files(tmp_path / "tae", [(1, 1, T0)], 1)
    empty = write_labels(tmp_path / "none.parquet", frame.iloc[:0])
    r = build_training_set_partitioned(
        empty, tmp_path / "c", tae_glob=tmp_path / "tae" / "*" / "*.parquet", ttl_seconds=10,
        partitions=4,
    )
    assert r.rows == 0 and len(r.files) == 1
    schema = pq.read_schema(r.files[0])
    assert schema.field("embedding").type == pa.list_(pa.float32()) and POSITION in schema.names


def test_a_stored_pandas_index_is_dropped_as_in_memory(tmp_path):
    frame = labels_frame([(1, 1, T0), (2, 2, T0 + 5)]).set_index(pd.Index([10, 20], name="orig"))
    frame.to_parquet(tmp_path / "labels.parquet")  # the index is stored as a column
    build_training_set_partitioned(
        tmp_path / "labels.parquet", tmp_path / "out", tae_glob=None, ttl_seconds=None
    )
    mem = point_in_time_join(pd.read_parquet(tmp_path / "labels.parquet"), tae_glob=None,
                             ttl_seconds=None)
    assert_same_rows(read_output(tmp_path / "out"), mem)


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_a_failure_leaves_no_output_and_no_scratch(tmp_path):
    """A bad label row in a later batch (pass 1) and a progress callback that raises between
    buckets (pass 2): no output directory, no partial or scratch files; a failed overwrite
    keeps the old output whole."""
    rows = [(u % 5, u % 3, T0 + u) for u in range(60)]
    write_tae_files(tmp_path / "tae", rows[::2], 2)
    glob = tmp_path / "tae" / "*" / "*.parquet"
    frame = labels_frame(rows)
    frame["user_id"] = frame["user_id"].astype(float)
    frame.loc[35, "user_id"] = 1.5
    bad = write_labels(tmp_path / "bad.parquet", frame)
    outs, scratch = tmp_path / "outs", tmp_path / "scratch"
    outs.mkdir()
    scratch.mkdir()
    with pytest.raises(ValueError, match=r"user_id must hold whole numbers, got 1\.5 \(row 35\)"):
        build_training_set_partitioned(
            bad, outs / "ts", tae_glob=glob, ttl_seconds=10, label_batch_rows=10,
            partitions=3, scratch_dir=scratch,
        )
    assert leftovers(outs, "ts") == [] and list(scratch.iterdir()) == []

    good = write_labels(tmp_path / "good.parquet", labels_frame(rows))
    seen = []

    def stop_after_two(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))
        if stage == "join" and done == 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        build_training_set_partitioned(
            good, outs / "ts", tae_glob=glob, ttl_seconds=10, partitions=4, progress=stop_after_two
        )
    assert leftovers(outs, "ts") == []
    assert ("partition", 90, 90) in seen and ("join", 1, 4) in seen  # 60 label + 30 TAE rows

    first = build_training_set_partitioned(good, outs / "ts", tae_glob=glob, ttl_seconds=10)
    with pytest.raises(FileExistsError, match="exists"):
        build_training_set_partitioned(good, outs / "ts", tae_glob=glob, ttl_seconds=10)
    with pytest.raises(RuntimeError, match="cancelled"):
        build_training_set_partitioned(
            good, outs / "ts", tae_glob=glob, ttl_seconds=10, partitions=4, overwrite=True,
            progress=stop_after_two,
        )
    assert leftovers(outs, "ts") == ["ts"] and [p.name for p in first.files] == ["part-00000.parquet"]
    assert sorted(p.name for p in (outs / "ts").iterdir()) == ["part-00000.parquet"]
    again = build_training_set_partitioned(
        good, outs / "ts", tae_glob=glob, ttl_seconds=10, partitions=4, overwrite=True
    )
    assert len(again.files) == 4 and leftovers(outs, "ts") == ["ts"]
    assert len(read_output(outs / "ts")) == 60


def test_choose_path_by_budget(tmp_path):
    rows = [(u % 7, u % 3, T0 + u) for u in range(500)]
    write_tae_files(tmp_path / "tae", rows[:200], 2, dim=16)
    labels = write_labels(tmp_path / "labels.parquet", labels_frame(rows))
    glob = tmp_path / "tae" / "*" / "*.parquet"
    under = choose_path(labels, glob, dim=16, budget_bytes=10**12)
    assert under.path == "in-memory" and under.label_rows == 500 and under.tae_rows == 200
    assert choose_path(labels, glob, dim=16, budget_bytes=under.estimate_bytes).path == "in-memory"
    over = choose_path(labels, glob, dim=16, budget_bytes=under.estimate_bytes - 1)
    assert over.path == "bounded" and "bounded" in over.describe()
    assert choose_path(labels, glob, dim=16).budget_bytes > 0  # default: a share of the machine
    assert estimate_in_memory_bytes(10**7, 5 * 10**6, 128) > 10 * estimate_in_memory_bytes(
        10**5, 5 * 10**4, 128) / 2


BAD_LABELS = {
    "missing column": lambda f: f.drop(columns=["item_id"]),
    "epoch numbers": lambda f: f.assign(event_timestamp=np.arange(len(f)) + 1_700_000_000),
    "missing time": lambda f: f.assign(event_timestamp=f["event_timestamp"].where(f.index != 3)),
    "not a time": lambda f: f.assign(event_timestamp=["2026-01-05T00:00:00Z"] * 2 + ["soon"] * (len(f) - 2)),
    "fractional id": lambda f: f.assign(item_id=f["item_id"].astype(float).where(f.index != 2, 1.5)),
    "text ids": lambda f: f.assign(user_id=f["user_id"].astype(str)),
    "before 1970": lambda f: f.assign(event_timestamp=pd.to_datetime(["1969-12-31"] * len(f), utc=True)),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_label_rows_give_the_in_memory_errors(tmp_path, case):
    frame = BAD_LABELS[case](labels_frame([(u, u, T0 + u) for u in range(8)]))
    labels = write_labels(tmp_path / "labels.parquet", frame)
    with pytest.raises(ValueError) as mem:
        point_in_time_join(pq.read_table(labels).to_pandas(), tae_glob=None, ttl_seconds=None)
    with pytest.raises(ValueError) as ours:
        build_training_set_partitioned(labels, tmp_path / "out", tae_glob=None, ttl_seconds=None)
    assert str(ours.value) == str(mem.value)
    assert leftovers(tmp_path, "out") == []


def test_errors_in_a_later_batch_name_the_input_row(tmp_path):
    frame = labels_frame([(u, u, T0 + u) for u in range(30)])
    frame["event_timestamp"] = frame["event_timestamp"].where(frame.index != 23)
    labels = write_labels(tmp_path / "labels.parquet", frame)
    with pytest.raises(ValueError, match=r"first: row 23\)"):
        point_in_time_join(frame, tae_glob=None, ttl_seconds=None)
    with pytest.raises(ValueError, match=r"missing on 1 of 10 rows \(first: row 23\)"):
        build_training_set_partitioned(
            labels, tmp_path / "out", tae_glob=None, ttl_seconds=None, label_batch_rows=10
        )
    frame = labels_frame([(u, u, T0) for u in range(3)]).assign(label_row=1)
    with pytest.raises(ValueError, match="named 'label_row'"):
        build_training_set_partitioned(
            write_labels(tmp_path / "r.parquet", frame), tmp_path / "out", tae_glob=None,
            ttl_seconds=None,
        )


def test_fingerprints_see_one_changed_bit_not_the_order(tmp_path):
    """The scale bench's row comparison: equal for the same rows in another order and
    layout, unequal for one flipped bit of one embedding or one missing embedding."""
    from store_bridge.bench_training_scale import fingerprints

    rows = [(u % 9, u % 4, T0 + u) for u in range(300)]
    write_tae_files(tmp_path / "tae", rows[::3], 2, dim=8)
    frame = labels_frame(rows).assign(row=np.arange(300))
    build_training_set_partitioned(
        write_labels(tmp_path / "labels.parquet", frame), tmp_path / "parts",
        tae_glob=tmp_path / "tae" / "*" / "*.parquet", ttl_seconds=None, partitions=5,
    )
    ref = fingerprints(tmp_path / "parts", 8)
    table = pq.read_table(tmp_path / "parts").sort_by("row")
    pq.write_table(table.take(np.random.default_rng(0).permutation(300)), tmp_path / "shuffled.parquet")
    assert ref.same_as(fingerprints(tmp_path / "shuffled.parquet", 8))
    assert 0 < ref.present.sum() < 300
    emb = table.column("embedding").to_pylist()
    k = next(i for i, e in enumerate(emb) if e)
    flipped = np.array(emb[k], dtype=np.float32)
    flipped.view(np.uint32)[5] ^= 1
    for change in (flipped.tolist(), None):
        edited = list(emb)
        edited[k] = change
        t = table.set_column(
            table.schema.get_field_index("embedding"), "embedding",
            pa.array(edited, pa.list_(pa.float32())),
        )
        pq.write_table(t, tmp_path / "edited.parquet")
        assert not ref.same_as(fingerprints(tmp_path / "edited.parquet", 8))


def test_run_child_caps(tmp_path):
    """A path past the memory cap or the time cap is killed and reported as such."""
    from store_bridge.bench_training_scale import run_child

    labels = write_labels(tmp_path / "labels.parquet", labels_frame([(1, 1, T0)]))
    spec = {"path": "bounded", "labels": str(labels), "tae_glob": str(tmp_path / "*" / "*.x"),
            "ttl_s": 10, "out": str(tmp_path / "out"), "bucket_bytes": 2**30}
    run = run_child(spec, mem_cap_bytes=30 * 2**20, time_cap_s=600, log=tmp_path / "a.log")
    assert run.status.startswith("killed at") and run.peak_rss_bytes > 30 * 2**20
    run = run_child(spec, mem_cap_bytes=2**40, time_cap_s=0.05, log=tmp_path / "b.log")
    assert run.status == "> 0.05 s" and not (tmp_path / "out").exists()
    run = run_child(spec, mem_cap_bytes=2**40, time_cap_s=600, log=tmp_path / "c.log")
    assert run.ok and run.figures["partitions"] == 1 and run.peak_rss_bytes > 0


def test_scale_bench_cli_tiny(redis_url, feature_repo, tmp_path):
    env = dict(os.environ, REDIS_URL=redis_url)
    scale_dir = tmp_path / "scale"
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "bench", "store", "--repo", str(feature_repo),
         "--scale-rows", "20000", "--dim", "16", "--scale-dir", str(scale_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])["scale"]
    assert lines[0].split("|")[1].strip() == "label rows" and "peak RSS GiB" in lines[0]
    table = [ln for ln in lines if ln.startswith("| 20,000")]
    assert [ln.split("|")[2].strip().split()[0] for ln in table] == ["in-memory", "bounded", "feast"]
    (size,) = result["sizes"]
    assert size["label_rows"] == 20000 and size["auto_choice"] == "in-memory"
    paths = size["paths"]
    assert paths["in-memory"]["identical"] is None  # the reference
    assert paths["bounded"]["identical"] is True and paths["feast"]["identical"] is True
    for r in paths.values():
        assert r["status"] == "ok" and r["rows"] == 20000 and r["peak_rss_gib"] > 0
        assert 0 < r["rows_with_embedding"] < 20000
    assert list(scale_dir.iterdir()) == []  # data, outputs and scratch removed
