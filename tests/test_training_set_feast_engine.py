"""`foundex training-set --engine feast` on Feast's Spark offline store, on a real local Spark
session: the rows equal the in-memory join's and the point-in-time oracle's (ties within and
across files, the TTL's edge, microsecond times, keys whose text runs together, rows without an
embedding or item features, repeated rows, naive times, a Python process outside UTC); the
parquet-in/parquet-out path writes the same rows; each fault of Feast's Spark store that the
engine works around is shown on Feast alone; the DuckDB store through the same engine; the CLI
end to end, which stops the Spark it started; a bad engine is refused.

One Spark session, started by the engine's own session code from the repo's `spark_conf`,
serves the module (a start costs seconds); the last test ends it."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_feature_repo
from test_training_set import T0, labels_frame, oracle
from typer.testing import CliRunner

from api.cli import app

TTL_S = 20
SEC = 1_000_000
# TAEs whose keys' text runs together: "1" "23" and "12" "3".
RUN_TOGETHER = [(1, 23, T0 + 5 * SEC), (12, 3, T0 + 7 * SEC)]
SUBSECOND = [(0, 0, T0 + 10_800_000), (0, 0, T0 + 10_300_000)]  # two in one second, later first
TIE_IN_FILE = [(2, 1, T0 + 40 * SEC), (2, 1, T0 + 40 * SEC)]  # one key and time, twice
TIE_ACROSS = (0, 1, T0 + 45 * SEC)  # in both files: the second file's wins
# spark_conf of the test repo: 3 shuffle partitions kept apart, so outputs come in several parts.
SPARK_CONF = ("  spark_conf:\n    spark.master: local[2]\n    spark.sql.shuffle.partitions: '3'\n"
              "    spark.sql.adaptive.coalescePartitions.enabled: 'false'\n")


def _write_tae_file(path: Path, rows: list[tuple[int, int, int]], first: int) -> None:
    """TAE k of the module (file order) is [k, k, k]; this file's rows are first.. ."""
    from store_bridge.logging_tier import tae_table

    u, i, t = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    m = np.repeat(np.arange(first, first + len(rows), dtype=np.float32)[:, None], 3, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tae_table(u, i, t, m), path)


@pytest.fixture(scope="module")
def spark_repo(tmp_path_factory, redis_url):
    """A repo whose feature_store.yaml says `type: spark` (SPARK_CONF), `feast apply` run on it
    (registered views keep their FileSource); v1 (3-d, TTL 20 s) with TAEs in two files of one
    day (random ones for users 0-2 x items 0-2 on whole seconds, RUN_TOGETHER, SUBSECOND,
    TIE_IN_FILE, TIE_ACROSS; then TIE_ACROSS again), v2 active with no offline file yet; items
    0-2 (item 1 changes at T0 + 30 s, item 2 has two rows at T0: the second wins); expert e1
    pins v1. Returns (repo, TAEs in file order)."""
    from experts import ExpertConfig, save_expert_config
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply

    path = copy_feature_repo(tmp_path_factory.mktemp("spark") / "feature_repo")
    yaml_path = path / "feature_store.yaml"
    text = yaml_path.read_text().replace("project: foundex", f"project: spark_{uuid.uuid4().hex[:8]}")
    assert "offline_store:\n  type: duckdb\n" in text
    yaml_path.write_text(text.replace("offline_store:\n  type: duckdb\n",
                                      "offline_store:\n  type: spark\n" + SPARK_CONF))
    repo = FeatureRepo(path)
    repo.save_manifest(Manifest(versions={v: FMVersion(
        version=v, dim=3, checkpoint=f"{v}.pt", digest=v, ttl_seconds=ttl,
        training_window=("2026-01-01", "2026-01-02"), created_at="2026-01-02",
    ) for v, ttl in (("v1", TTL_S), ("v2", 3600))}))
    save_expert_config(ExpertConfig(name="e1", surface="feed", tasks=["click"], fm_version="v1"),
                       repo.experts_dir)
    rng = np.random.default_rng(5)
    taes = sorted({(int(rng.integers(3)), int(rng.integers(3)), T0 + int(rng.integers(60)) * SEC)
                   for _ in range(30)})
    first = taes + RUN_TOGETHER + SUBSECOND + TIE_IN_FILE + [TIE_ACROSS]
    day = repo.tae_dir("v1") / "2026-01-05"
    _write_tae_file(day / "part-0.parquet", first, 0)
    _write_tae_file(day / "part-1.parquet", [TIE_ACROSS], len(first))
    pq.write_table(pa.table({
        "item_id": pa.array([0, 1, 2, 1, 2], pa.int64()),
        "category": pa.array([5, 6, 7, 8, 9], pa.int64()),
        "quality": pa.array([0.5, 0.25, 0.125, 0.75, 0.0625], pa.float32()),
        "event_timestamp": pa.array([T0, T0 + 30 * SEC, T0, T0 - 10 * SEC, T0],
                                    pa.timestamp("us", tz="UTC")),
    }), repo.data / "items.parquet")
    feast_apply(repo, redis_url)
    return repo, [*first, TIE_ACROSS]


@pytest.fixture(scope="module")
def feature_store(spark_repo, redis_url):
    from api.services.context import ServiceContext
    from api.settings import Settings

    settings = Settings()
    settings.repo = spark_repo[0].path
    return ServiceContext(settings, redis_url).feature_store


@pytest.fixture(scope="module")
def spark(spark_repo, feature_store):
    """The session the engine's own code starts from the repo's spark_conf (`session`), held
    for the module; `close` ends it (`test_cli_feast_engine_end_to_end_and_stops_its_spark`)."""
    from pyspark.sql import SparkSession

    from store_bridge.feast_training_set import spark_session

    assert SparkSession.getActiveSession() is None
    stack = contextlib.ExitStack()
    session = stack.enter_context(spark_session(feature_store))
    yield SimpleNamespace(session=session, close=stack.close)
    stack.close()


def _label_rows(taes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(6)
    rows = [(int(rng.integers(3)), int(rng.integers(4)), T0 + int(rng.integers(-5, 90)) * SEC)
            for _ in range(40)]  # item 3 has no features; times before every TAE too
    rows += [(u, i, t) for u, i, t in taes[:6]]  # at a TAE's own time
    rows += [(u, i, t + TTL_S * SEC) for u, i, t in taes[6:12]]  # at the TTL's edge
    rows += [(u, i, t + TTL_S * SEC + 1) for u, i, t in taes[12:18]]  # 1 us past it
    rows += [(1, 23, T0 + 9 * SEC), (12, 3, T0 + 9 * SEC)]  # RUN_TOGETHER's keys, one time
    rows += [(0, 0, T0 + 10_500_000), (0, 0, T0 + 10_900_000)]  # within SUBSECOND's second
    rows += [(2, 1, T0 + 41 * SEC), (0, 1, T0 + 46 * SEC)]  # after the ties
    rows += [(9, 0, T0 + 10 * SEC), (9, 0, T0 + 10 * SEC)]  # an unknown user, twice
    return rows + rows[:4]  # repeated rows


def _last_wins_oracle(taes, rows) -> list[int | None]:
    """test_training_set's oracle with ties going to the TAE that comes last in file order
    (it takes the first; so: over the TAEs reversed)."""
    n = len(taes)
    return [None if k is None else n - 1 - k for k in oracle(taes[::-1], rows, TTL_S * SEC)]


def _naive(frame: pd.DataFrame) -> pd.DataFrame:
    """The same label rows with naive times (UTC), which both engines take as UTC."""
    return frame.assign(event_timestamp=frame["event_timestamp"].dt.tz_localize(None))


def _index(e) -> int | None:
    return None if e is None else int(e[0])  # TAE k is [k, k, k]


def _assert_same_rows(theirs: pd.DataFrame, ours: pd.DataFrame) -> None:
    assert list(theirs.columns) == list(ours.columns)
    pd.testing.assert_frame_equal(theirs.drop(columns="embedding"), ours.drop(columns="embedding"))
    for a, b in zip(ours["embedding"], theirs["embedding"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert b.dtype == np.float32 and not b.flags.writeable
            np.testing.assert_array_equal(a, b)


def test_spark_engine_equals_in_memory_join_and_oracle(spark, spark_repo, feature_store):
    from store_bridge.feast_training_set import feast_training_set
    from store_bridge.training_set import expert_training_set

    repo, taes = spark_repo
    entry = repo.load_manifest().versions["v1"]
    rows = _label_rows(taes)
    frame = _naive(labels_frame(rows))
    theirs = feast_training_set(feature_store, repo, frame.copy(), entry)
    _assert_same_rows(theirs, expert_training_set(repo, frame.copy(), entry))
    want = _last_wins_oracle(taes, rows)
    got = [_index(e) for e in theirs["embedding"]]
    assert got == want
    # Not vacuous: each case the engine works around gave the rule's TAE.
    at = {r: got[k] for k, r in enumerate(rows)}
    assert at[1, 23, T0 + 9 * SEC] == taes.index(RUN_TOGETHER[0])
    assert at[12, 3, T0 + 9 * SEC] == taes.index(RUN_TOGETHER[1])
    assert at[0, 0, T0 + 10_500_000] == taes.index(SUBSECOND[1])  # 10.3 s, not 10.8 s
    assert at[2, 1, T0 + 41 * SEC] == taes.index(TIE_IN_FILE[0]) + 1  # the later row
    assert at[0, 1, T0 + 46 * SEC] == len(taes) - 1  # the second file's
    expired = [k for k, (u, i, t) in enumerate(rows) if want[k] is None
               and any(tu == u and ti == i and tt <= t for tu, ti, tt in taes)]
    assert sum(w is not None for w in want) > 15 and len(expired) >= 6
    assert theirs["category"].isna().sum() > 0 and theirs["category"].dtype == np.float64
    item_2 = theirs.loc[(theirs["item_id"] == 2) & theirs["category"].notna(), "category"]
    assert set(item_2) == {9.0}  # item 2's two rows at T0: the second wins, as in memory

    # The no-FM baseline: item features alone, no embedding column.
    base = feast_training_set(feature_store, repo, frame.copy(), None, ["quality"])
    pd.testing.assert_frame_equal(base, expert_training_set(repo, frame.copy(), None, ["quality"]))


def test_spark_engine_is_right_outside_utc(spark, spark_repo, feature_store):
    """The same rows when this Python process's local time zone is not UTC (Feast alone loses
    matches then: `test_feast_spark_store_alone_...`); and a version with no offline file yet
    gives rows without an embedding."""
    from store_bridge.feast_training_set import feast_training_set
    from store_bridge.training_set import expert_training_set

    repo, taes = spark_repo
    versions = repo.load_manifest().versions
    frame = labels_frame(_label_rows(taes))
    with _local_time_zone("America/New_York"):
        theirs = feast_training_set(feature_store, repo, frame.copy(), versions["v1"], [])
    _assert_same_rows(theirs, expert_training_set(repo, frame.copy(), versions["v1"], []))
    assert theirs["embedding"].notna().sum() > 15

    none_yet = feast_training_set(feature_store, repo, frame.copy(), versions["v2"], [])
    assert none_yet["embedding"].isna().all()
    _assert_same_rows(none_yet, expert_training_set(repo, frame.copy(), versions["v2"], []))


@contextlib.contextmanager
def _local_time_zone(name: str):
    saved = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.filterwarnings("ignore:The spark:RuntimeWarning")  # "experimental feature"
def test_feast_spark_store_alone_runs_keys_together_repeats_ties_and_misreads_zones(
    spark, spark_repo, feature_store
):
    """Why the engine hands Feast its own sources and NTZ times: Feast 0.67's Spark store,
    given a plain SparkSource of the same files, (1) gives (1, 23) the TAE of (12, 3) at the
    same time (its row id concatenates "1" "23" and "12" "3" alike), (2) returns a label row
    once per tied TAE, (3) outside UTC, with a Spark entity frame, loses matches (it reads the
    frame's time range as local times, then takes them as UTC). If one of these fails, Feast
    fixed it: the engine's workaround (module doc) and the README's note can go."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    repo, taes = spark_repo
    table = f"plain_{uuid.uuid4().hex[:8]}"
    spark.session.read.parquet(str(repo.tae_dir("v1") / "*" / "*.parquet")).createOrReplaceTempView(
        table)
    view = feature_store.get_feature_view("fm_tae_v1").__copy__()
    view.batch_source = SparkSource(name=table, table=table, timestamp_field="event_timestamp")

    def ask(entity_df) -> pd.DataFrame:
        return feature_store.provider.get_historical_features(
            config=feature_store.config, feature_views=[view],
            feature_refs=["fm_tae_v1:embedding"], entity_df=entity_df,
            registry=feature_store.registry, project=feature_store.project,
            full_feature_names=True,
        ).to_df()

    rows = [(1, 23, T0 + 9 * SEC), (12, 3, T0 + 9 * SEC), (2, 1, T0 + 41 * SEC),
            (0, 1, T0 + 46 * SEC)]
    got = ask(labels_frame(rows))  # pandas in: Feast's own documented input
    runs = {(r.user_id, r.item_id): _index(r.fm_tae_v1__embedding) for r in got.itertuples()}
    assert runs[1, 23] == runs[12, 3] == taes.index(RUN_TOGETHER[1])  # (1, 23) got (12, 3)'s
    assert sorted(got["user_id"].tolist()) == [0, 0, 1, 2, 2, 12]  # each tie: the row twice

    rows = [(u, i, t + SEC) for u, i, t in taes[:20]]
    assert all(w is not None for w in _last_wins_oracle(taes, rows))
    with _local_time_zone("America/New_York"):
        lost = ask(spark.session.createDataFrame(labels_frame(rows)))
    assert len(lost) == len(rows) and lost["fm_tae_v1__embedding"].isna().all()


def test_parts_path_equals_in_memory_join(spark, spark_repo, redis_url, tmp_path):
    """Label rows read by Spark from parquet (pandas' nanosecond naive times, a column that
    passes through), the training set written by Spark as parquet parts: the in-memory
    join's rows in input order, `label_row` last, nothing else in the folder."""
    from api.services import offline
    from api.services.context import ServiceContext
    from api.settings import Settings
    from store_bridge.training_set import expert_training_set

    repo, taes = spark_repo
    rows = _label_rows(taes)
    frame = _naive(labels_frame(rows)).assign(note=[f"r{k}" for k in range(len(rows))])
    entities = tmp_path / "labels.parquet"
    frame.to_parquet(entities)
    assert pq.read_schema(entities).field("event_timestamp").type == pa.timestamp("ns")
    settings = Settings()
    settings.repo = repo.path
    ctx = ServiceContext(settings, redis_url)
    plan = offline.plan_training_set(ctx, "e1")
    notes = []
    out = tmp_path / "ts"
    result = offline.write_feast_training_set_parts(ctx, plan, entities, out, on_note=notes.append)

    assert notes == ["event_timestamp has no time zone; its times are taken as UTC"]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) > 1 and names == [f"part-{k:05d}.parquet" for k in range(len(names))]
    assert result.files == [out / n for n in names] and result.rows == len(rows)
    parts = pq.read_table(out).to_pandas()  # in name order
    assert parts["label_row"].tolist() == list(range(len(rows)))
    ours = expert_training_set(repo, frame.copy(), plan.entry)
    pd.testing.assert_frame_equal(parts.drop(columns=["embedding", "label_row"]),
                                  ours.drop(columns="embedding"))
    assert ([None if e is None else int(e[0]) for e in parts["embedding"]]
            == [_index(e) for e in ours["embedding"]] == _last_wins_oracle(taes, rows))
    assert result.rows_without_embedding == int(ours["embedding"].isna().sum()) > 0

    from api.services.errors import Invalid

    text = tmp_path / "text_times.parquet"
    frame.assign(event_timestamp="2026-01-05T00:00:00Z").to_parquet(text)
    with pytest.raises(Invalid, match=r"event_timestamp holds string values; label rows read by "
                       r"Spark need a timestamp column: .* \(ISO 8601 text works with --engine "
                       r"foundex\)"):  # checked on the file's schema, before Spark reads it
        offline.write_feast_training_set_parts(ctx, plan, text, tmp_path / "ts_text")
    with pytest.raises(Invalid, match=r"training-set output .*ts exists; choose a new directory"):
        offline.write_feast_training_set_parts(ctx, plan, entities, out)
    again = offline.write_feast_training_set_parts(ctx, plan, entities, out, overwrite=True)
    assert again.rows == len(rows) and sorted(p.name for p in out.iterdir()) == names


@pytest.mark.parametrize("column, values, message", [
    ("event_timestamp", pa.array(["2026-01-05T00:00:00Z"] * 3),
     r"event_timestamp holds string values; label rows read by Spark need a timestamp column"),
    ("event_timestamp", pa.array([T0, None, None], pa.timestamp("us", tz="UTC")),
     r"event_timestamp is missing on 2 of 3 rows \(first: row 1\)"),
    ("event_timestamp", pa.array([T0, T0, 10_000_000_000_000_000], pa.timestamp("us", tz="UTC")),
     r"event_timestamp 2286-11-20T17:46:40\+00:00 \(row 2\) is outside the supported range "
     r"1970-01-01 \.\. 2262-04-10 UTC \(1 of 3 rows\)"),
    ("event_timestamp", pa.array([1, 2, 3], pa.int64()),
     r"event_timestamp holds numbers \(bigint\), not timestamps"),
    ("user_id", pa.array([1.0, 2.5, 3.0]), r"user_id must hold whole numbers, got 2\.5 \(row 1\)"),
    ("item_id", pa.array([1, None, 3], pa.int64()), r"item_id must hold whole numbers, got nan \(row 1\)"),
])
def test_parts_path_refuses_bad_label_rows(spark, spark_repo, feature_store, tmp_path, column,
                                           values, message):
    from store_bridge.feast_training_set import feast_training_set_parts

    repo, _ = spark_repo
    good = {"user_id": pa.array([0, 1, 2], pa.int64()), "item_id": pa.array([0, 1, 2], pa.int64()),
            "event_timestamp": pa.array([T0] * 3, pa.timestamp("us", tz="UTC")),
            "click": pa.array([1.0, 0.0, 1.0])}
    entities = tmp_path / "labels.parquet"
    pq.write_table(pa.table({**good, column: values}), entities)
    with pytest.raises(ValueError, match=message):
        feast_training_set_parts(feature_store, repo, entities, tmp_path / "ts",
                                 repo.load_manifest().versions["v1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.parquet"]  # nothing left


def test_parts_path_no_rows_and_only_on_spark(spark, spark_repo, feature_store, redis_url,
                                              tmp_path):
    """No label rows: one empty part with the columns' types. A store other than Spark is
    refused before anything runs."""
    from store_bridge.feast_training_set import feast_training_set_parts
    from store_bridge.training_set import expert_training_set

    repo, _ = spark_repo
    entry = repo.load_manifest().versions["v1"]
    empty = labels_frame([(0, 0, T0)]).iloc[:0]
    entities = tmp_path / "labels.parquet"
    empty.to_parquet(entities)
    result = feast_training_set_parts(feature_store, repo, entities, tmp_path / "ts", entry)
    assert result.rows == 0 and [p.name for p in result.files] == ["part-00000.parquet"]
    got = pq.read_table(result.files[0])
    want = pa.Table.from_pandas(expert_training_set(repo, empty.copy(), entry),
                                preserve_index=False)
    assert got.num_rows == 0 and got.column_names == [*want.column_names, "label_row"]
    assert got.schema.field("category").type == pa.int64()
    assert got.schema.field("embedding").type.value_type == pa.float32()

    duck = _duckdb_store(repo, redis_url)
    with pytest.raises(ValueError, match=r"needs Feast's Spark offline store .* this repo's is "
                                         r"duckdb"):
        feast_training_set_parts(duck, repo, entities, tmp_path / "ts2", entry)


def _duckdb_store(repo, redis_url):
    """A FeatureStore over the same repo and registry with the default DuckDB offline store."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    from store_bridge.redis_server import feast_connection_string

    raw = yaml.safe_load((repo.path / "feature_store.yaml").read_text().replace(
        "${FOUNDEX_FEAST_REDIS}", feast_connection_string(redis_url)))
    raw["offline_store"] = {"type": "duckdb"}
    config = RepoConfig(**raw)
    config.repo_path = repo.path
    return FeatureStore(repo_path=str(repo.path), config=config)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ibis's use of a DuckDB call
def test_feast_engine_on_duckdb_equals_in_memory_join(spark_repo, redis_url):
    """The default offline store through the same engine (registered views, Feast's own TTL);
    no ties here: the DuckDB store settles them its own way."""
    from store_bridge.feast_training_set import feast_training_set
    from store_bridge.training_set import expert_training_set

    repo, taes = spark_repo
    entry = repo.load_manifest().versions["v1"]
    tied = {TIE_IN_FILE[0][:2], TIE_ACROSS[:2]}
    rows = [r for r in _label_rows(taes) if r[:2] not in tied and r[1] != 2]  # item 2 ties too
    frame = _naive(labels_frame(rows))
    theirs = feast_training_set(_duckdb_store(repo, redis_url), repo, frame.copy(), entry)
    _assert_same_rows(theirs, expert_training_set(repo, frame.copy(), entry))
    assert theirs["embedding"].notna().sum() > 10


def test_a_bad_engine_is_refused(spark_repo, tmp_path):
    from api.services import offline
    from api.services.context import ServiceContext
    from api.services.errors import Invalid
    from api.settings import Settings

    repo, _ = spark_repo
    entities = tmp_path / "labels.parquet"
    labels_frame([(0, 0, T0)]).to_parquet(entities)
    r = CliRunner().invoke(app, [
        "training-set", "--expert", "e1", "--entities", str(entities),
        "--out", str(tmp_path / "ts.parquet"), "--repo", str(repo.path), "--engine", "spark",
    ])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --engine 'spark': one of foundex, feast"
    assert not (tmp_path / "ts.parquet").exists()

    settings = Settings()
    settings.repo = repo.path
    ctx = ServiceContext(settings, "redis://unused")
    plan = offline.plan_training_set(ctx, "e1")
    with pytest.raises(Invalid, match=r"unknown training-set engine 'spark' \(choose from: "
                                      r"foundex, feast\)"):
        offline.build_training_set(ctx, plan, labels_frame([(0, 0, T0)]), engine="spark")


def test_cli_feast_engine_end_to_end_and_stops_its_spark(spark, spark_repo, tmp_path, redis_url):
    """Last (it ends the module's session): `foundex training-set --engine feast` starts Spark
    from the repo's spark_conf, writes the file `--engine foundex` writes, says the same line
    on stdout, and stops its Spark when done."""
    from pyspark.sql import SparkSession

    spark.close()
    assert SparkSession.getActiveSession() is None
    repo, taes = spark_repo
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
        assert "note: event_timestamp has no time zone; its times are taken as UTC" in r.stderr
        assert SparkSession.getActiveSession() is None
    assert said["feast"] == said["foundex"]
    assert said["feast"].startswith(f"wrote {len(rows)} rows to OUT (") and said["feast"].count("\n") == 1
    a, b = pd.read_parquet(outputs["foundex"]), pd.read_parquet(outputs["feast"])
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), b.drop(columns="embedding"))
    assert [_index(e) for e in a["embedding"]] == [_index(e) for e in b["embedding"]]

    # A folder output: Spark reads the label file and writes the parts itself.
    folder = tmp_path / "feast_parts"
    r = CliRunner().invoke(app, [
        "training-set", "--expert", "e1", "--entities", str(entities), "--out", str(folder),
        "--repo", str(repo.path), "--engine", "feast",
    ], env={"REDIS_URL": redis_url, "FOUNDEX_REPO": None})
    assert r.exit_code == 0, (r.output, r.exception)
    assert "join: engine feast: Feast's Spark offline store read the label rows" in r.stderr
    assert SparkSession.getActiveSession() is None
    parts = pd.read_parquet(folder).sort_values("label_row").reset_index(drop=True)
    assert list(parts["label_row"]) == list(range(len(rows)))
    pd.testing.assert_frame_equal(parts.drop(columns=["embedding", "label_row"]),
                                  a.drop(columns="embedding"), check_dtype=False)
    assert [_index(e) for e in parts["embedding"]] == [_index(e) for e in a["embedding"]]
