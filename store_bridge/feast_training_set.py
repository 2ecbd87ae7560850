"""Training sets through Feast's own offline store (`foundex training-set --engine feast`).

The same rows as `training_set.expert_training_set` (the in-memory join), built by Feast's
`get_historical_features` on the offline store that `feature_store.yaml` configures:

  * DuckDB (the default) and any other store: the registered views, asked once per view for
    the distinct (user, item, time) of the label rows; pandas in, pandas out.
  * Spark (`offline_store: type: spark`): both views in one call, label rows handed over as a
    Spark DataFrame and the answer kept as one (`RetrievalJob.to_spark_df`). It is collected
    for a frame (`feast_training_set`), or, from a label file read by Spark, written by Spark
    as parquet parts (`feast_training_set_parts`): then no row passes through this process.

Feast 0.67's Spark store departs from the point-in-time rule in three ways; each is worked
around here, and `tests/test_training_set_feast_engine.py` shows each on Feast alone:
  * its row id is the text of the join keys and the time concatenated without a separator,
    so (user 1, item 23) and (user 12, item 3) at one time share an id and one of them gets
    the other's TAE. The keys go in as text ending in KEY_END ("1/", "23/"), on both sides.
  * on a tie (several feature rows of one key at the latest time) the label row comes back
    once per tied row. Feast de-duplicates on a `created_timestamp_column`: the sources given
    to it carry one (ORDER) that orders rows as the in-memory join does (file order, then
    row order; the last wins).
  * it reads the time range of a Spark entity frame as naive datetimes in the Python
    process's local time zone and then takes them as UTC: outside UTC its time filters move
    by the offset and matches are lost. Label times go in as TIMESTAMP_NTZ (UTC wall time),
    which comes back as UTC, and the session's time zone is UTC for the call.
The first two need sources of foundex's own, so each view goes to Feast as an unregistered
copy whose SparkSource is a temporary Spark view of the same parquet files the in-memory join
reads (the registered views keep their FileSource: `feast apply` then needs no JVM, and does
not fail on a version with no offline file yet, as a SparkSource's check would). A version
with no offline files is not asked (Spark refuses a path that matches nothing): every row is
without an embedding. Spark's own limits met on the way (nanosecond parquet timestamps, the
regex column names Feast leaves switched on) are in `_CALL_CONF`. Every answer is checked to
hold each label row exactly once (FeastJoinError otherwise).
"""

from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fm.timefeatures import timestamps_us
from store_bridge.events.schema import EVENT_TIMESTAMP, ITEM_FEATURES
from store_bridge.feast_objects import ITEM_VIEW
from store_bridge.repo import FeatureRepo, FMVersion, view_name
from store_bridge.training_set import (
    EARLIEST_US,
    LATEST_US,
    _key_column,
    _offline_files,
    label_timestamps,
)
from store_bridge.training_set_partitioned import EMBEDDING, POSITION, _publish, label_columns

QUERY = "foundex_query"  # DuckDB path: the id of a distinct (user, item, time)
ORDER = "foundex_order"  # Spark sources: the created_timestamp that breaks ties (file, row)
KEY_END = "/"  # ends every join key's text on the Spark path (see the module doc)
_ROW_BITS = 32  # ORDER = file rank << _ROW_BITS | row in file, as microseconds
_FILE, _ROW = "__fx_file", "__fx_row"  # `_read_parquet`: each row's file and row in it

# A session this module starts: local, 2 cores, a small driver, no UI or progress bars, UTC.
# feature_store.yaml's `spark_conf` overrides any of them (`spark.master` for a cluster).
SPARK_DEFAULTS = {
    "spark.master": "local[2]",
    "spark.driver.memory": "1g",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}
# Only for a local master: the driver on loopback (no "hostname resolves to a loopback
# address" warning, nothing listening on other interfaces), and 16 shuffle partitions instead
# of 200, whose per-task costs dominate on a few cores (parquet parts for 4,000 label rows on
# 2 busy cores: 8-13 s, against 30 s with 200).
_LOCAL_ONLY = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.sql.shuffle.partitions": "16",
}
# Set on the session for each call (and put back after it on a session this module did not
# start): times compared and written as UTC, parquet timestamps written as int64 microseconds,
# nanosecond ones (pandas' default, which Spark cannot read) read as int64 (`_read_parquet`),
# `quoted` column names as names (Feast's session getter turns them into regular expressions,
# for good: set again after each Feast call).
_CALL_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.legacy.parquet.nanosAsLong": "true",
    "spark.sql.parser.quotedRegexColumnNames": "false",
}
_QUOTED_REGEX = "spark.sql.parser.quotedRegexColumnNames"
# The driver's log4j2 configuration when feature_store.yaml sets no driver Java options:
# errors only, on stderr (Spark's default prints INFO and WARN lines at every start).
_LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n
logger.spark.name = org.apache.spark
logger.spark.level = error
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
"""


class FeastJoinError(RuntimeError):
    """Feast's offline store answered something that is not the point-in-time join: label rows
    lost or repeated, or files read that the offline glob does not list."""


class SparkUnavailable(ConnectionError):
    """Spark could not start (no Java runtime, a cluster that does not answer)."""


@dataclass(frozen=True)
class FeastParts:
    """What `feast_training_set_parts` wrote: `rows` label rows in = rows out;
    `rows_without_embedding` (None: no `embedding` column); the part files, in input order;
    `time_note`: label times without a zone were taken as UTC (else None)."""

    out_dir: Path
    rows: int
    rows_without_embedding: int | None
    files: list[Path]
    time_note: str | None


def offline_store_kind(fs: Any) -> str:
    """'spark', 'duckdb', ...: what the store's `offline_store` config names."""
    cfg = fs.config.offline_store
    return "spark" if _is_spark(fs) else str(getattr(cfg, "type", type(cfg).__name__))


def _is_spark(fs: Any) -> bool:
    # The class, not `type`: feature_store.yaml may name the store by its class path.
    return type(fs.config.offline_store).__name__ == "SparkOfflineStoreConfig"


def feast_training_set(
    fs: Any,
    repo: FeatureRepo,
    labels: pd.DataFrame,
    fm_version: FMVersion | None,
    item_features: list[str] = ITEM_FEATURES,
) -> pd.DataFrame:
    """The training set of an expert pinned to `fm_version` (None: the no-FM baseline), built
    by `fs`'s configured offline store; the same frame as `expert_training_set`.

    `fs`: a `feast.FeatureStore` over `repo` with its views applied. `labels`: user_id,
    item_id (whole numbers), event_timestamp (see `label_timestamps`); other columns pass
    through. Output rows are in input order; `embedding` is a read-only float32 array or None
    where no TAE is in range (no such column without `fm_version`); item features are float64
    with NaN when some row has no item row at or before its time, else their parquet type.
    On Spark the answer is collected here (use `feast_training_set_parts` for sets larger than
    this process's memory). Raises ValueError (bad rows, an item feature the `item_features`
    view lacks, embeddings of mixed width), FeastJoinError, SparkUnavailable, Feast's own
    errors (e.g. a view never applied), Spark's (e.g. an unreadable offline file)."""
    out = labels.reset_index(drop=True)
    for col in ("user_id", "item_id", EVENT_TIMESTAMP):
        if col not in out.columns:
            raise ValueError(f"label rows lack column {col!r}")
    out[EVENT_TIMESTAMP], _ = label_timestamps(out[EVENT_TIMESTAMP])
    keys = np.stack([_key_column(out, "user_id"), _key_column(out, "item_id"),
                     timestamps_us(out[EVENT_TIMESTAMP])], axis=1)
    if len(out) == 0:  # nothing to ask
        schema = pq.read_schema(repo.data / "items.parquet") if item_features else None
        for c in item_features:
            out[c] = np.empty(0, schema.field(c).type.to_pandas_dtype())
        if fm_version is not None:
            out[EMBEDDING] = np.empty(0, dtype=object)
        return out
    if _is_spark(fs):
        got = _spark_frame_answer(fs, repo, keys, fm_version, item_features)
    else:
        got = _registered_answer(fs, keys, fm_version, item_features)
    if item_features:
        widen = any(got.column(c).null_count for c in item_features)
        schema = pq.read_schema(repo.data / "items.parquet")
        for c in item_features:
            column = got.column(c).cast(pa.float64() if widen else schema.field(c).type)
            out[c] = column.to_numpy() if not widen else column.fill_null(np.nan).to_numpy()
    if fm_version is not None:
        out[EMBEDDING] = _vectors(got.column(EMBEDDING), view_name(fm_version.version))
    return out


# ---------------------------------------------------------------------------------------------
# DuckDB and other stores: the registered views, pandas in and out


def _registered_answer(
    fs: Any, keys: np.ndarray, fm_version: FMVersion | None, item_features: list[str]
) -> pa.Table:
    """Feast's answer on the registered views: one row per label row (in order), columns
    `item_features` then `embedding`."""
    distinct, inverse = np.unique(keys, axis=0, return_inverse=True)
    query = pd.DataFrame({
        "user_id": distinct[:, 0], "item_id": distinct[:, 1],
        # Microseconds: Feast's DuckDB store refuses nanosecond times.
        EVENT_TIMESTAMP: pd.Series(distinct[:, 2].astype("datetime64[us]")).dt.tz_localize("UTC"),
        QUERY: np.arange(len(distinct), dtype=np.int64),
    })
    columns: dict[str, pa.ChunkedArray] = {}
    if item_features:
        answer = _answer(fs, fs.get_feature_view(ITEM_VIEW), item_features, query)
        columns.update({c: answer.column(f"{ITEM_VIEW}__{c}") for c in item_features})
    if fm_version is not None:
        name = view_name(fm_version.version)
        columns[EMBEDDING] = _answer(fs, fs.get_feature_view(name), [EMBEDDING], query).column(
            f"{name}__{EMBEDDING}")
    return pa.table(columns).take(pa.array(inverse.reshape(-1)))


def _answer(fs: Any, view: Any, features: list[str], query: pd.DataFrame) -> pa.Table:
    """Feast's answer for `features` of the registered `view` at the distinct label rows in
    `query`: one row per QUERY id, in QUERY order; columns `<view>__<feature>`."""
    _check_features(view, features)
    with warnings.catch_warnings():  # ibis's own deprecated DuckDB call, printed on every run
        warnings.filterwarnings("ignore", "fetch_arrow_table", DeprecationWarning)
        job = fs.get_historical_features(
            entity_df=query, features=[f"{view.name}:{f}" for f in features],
            full_feature_names=True,
        )
        answer = job.to_arrow()
    ids = answer.column(QUERY).to_numpy() if QUERY in answer.column_names else np.empty(0, np.int64)
    if len(ids) != len(query) or not np.array_equal(np.sort(ids), query[QUERY].to_numpy()):
        raise FeastJoinError(
            f"Feast's {offline_store_kind(fs)} offline store answered {answer.num_rows:,} rows "
            f"({len(np.unique(ids)):,} distinct) for {len(query):,} distinct label rows of "
            f"view {view.name}"
        )
    return answer.take(pa.array(np.argsort(ids, kind="stable")))


def _check_features(view: Any, features: list[str]) -> None:
    have = [f.name for f in view.features]
    if absent := [f for f in features if f not in have]:
        raise ValueError(f"features {absent} are not in Feast's {view.name} view (has: {have})")


def _vectors(values: pa.ChunkedArray, name: str) -> np.ndarray:
    """An embedding column as an object array of read-only float32 vectors (views into one
    matrix) or None where null or empty (Feast's "no match")."""
    column = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    out = np.full(len(column), None, dtype=object)
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    present = np.flatnonzero(lengths > 0)
    if present.size == 0:
        return out
    if (widths := np.unique(lengths[present])).size > 1:
        raise ValueError(f"{name}: embeddings are not all of one dimension ({widths.tolist()})")
    flat = column.take(pa.array(present)).flatten()
    matrix = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrix = matrix.reshape(present.size, int(widths[0]))
    matrix.setflags(write=False)
    out[present] = np.fromiter(matrix, dtype=object, count=present.size)
    return out


# ---------------------------------------------------------------------------------------------
# Spark: the session


def local_spark_conf(spark_conf: dict[str, Any] | None = None) -> dict[str, str]:
    """The configuration of a session this module starts: SPARK_DEFAULTS, the loopback
    driver for a local master, then feature_store.yaml's `spark_conf` over them."""
    conf = {**SPARK_DEFAULTS, **{k: str(v) for k, v in (spark_conf or {}).items()}}
    if conf["spark.master"].startswith("local"):
        conf = {**_LOCAL_ONLY, **conf}
    return conf


@contextmanager
def spark_session(fs: Any) -> Iterator[Any]:
    """The Spark session Feast's Spark store will use for a call: the active one, else one
    started here from `local_spark_conf(spark_conf)` (errors only in the log) and stopped when
    the block ends. For the block the session works in UTC and writes parquet timestamps as
    microseconds (`_CALL_CONF`). Raises SparkUnavailable when Spark cannot start."""
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    began = spark is None
    if began:
        spark = _start_spark(fs.config.offline_store.spark_conf)
    saved = {k: spark.conf.get(k, None) for k in _CALL_CONF}
    for k, v in _CALL_CONF.items():
        spark.conf.set(k, v)
    try:
        yield spark
    finally:
        if began:
            spark.stop()
        else:
            for k, v in saved.items():
                if v is None:
                    spark.conf.unset(k)
                else:
                    spark.conf.set(k, v)


def _start_spark(spark_conf: dict[str, Any] | None) -> Any:
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    conf = local_spark_conf(spark_conf)
    log_config = None
    if "spark.driver.extraJavaOptions" not in conf:
        fd, log_config = tempfile.mkstemp(prefix="foundex-spark-log4j2-", suffix=".properties")
        with os.fdopen(fd, "w") as f:
            f.write(_LOG4J2)
        conf["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile={Path(log_config).as_uri()}"
    try:
        spark = SparkSession.builder.config(conf=SparkConf().setAll(list(conf.items()))).getOrCreate()
    except (RuntimeError, OSError) as e:  # PySparkRuntimeError JAVA_GATEWAY_EXITED: no java
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise SparkUnavailable(
            f"Spark did not start (master {conf['spark.master']}): {first}. Feast's Spark "
            "offline store needs a Java runtime (17 or 21) on PATH or in JAVA_HOME"
        ) from e
    finally:
        if log_config is not None:
            os.unlink(log_config)  # read once, when the driver started
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@contextmanager
def _temp_views(spark: Any) -> Iterator[list[str]]:
    """A list to record the Spark temporary views a call registers; dropped after it."""
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            spark.catalog.dropTempView(name)


# ---------------------------------------------------------------------------------------------
# Spark: the join


def _spark_frame_answer(
    fs: Any, repo: FeatureRepo, keys: np.ndarray, fm_version: FMVersion | None,
    item_features: list[str],
) -> pa.Table:
    """Spark's answer for the label rows `keys` ((n, 3) int64: user, item, time in µs),
    collected: one row per label row, in order; columns `item_features` then `embedding`."""
    n = len(keys)
    keys = np.ascontiguousarray(keys.T)
    table = pa.table({
        "user_id": keys[0], "item_id": keys[1],
        EVENT_TIMESTAMP: pa.array(keys[2]).cast(pa.timestamp("us", tz="UTC")),
        POSITION: np.arange(n, dtype=np.int64),
    })
    with spark_session(fs) as spark, _temp_views(spark) as made:
        answer = _spark_answer(spark, fs, repo, spark.createDataFrame(table), fm_version,
                               item_features, made)
        got = answer.toArrow()
    rows = got.column(POSITION).to_numpy()
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise FeastJoinError(
            f"Feast's spark offline store answered {len(rows):,} rows "
            f"({len(np.unique(rows)):,} distinct label rows) for {n:,} label rows"
        )
    return got.drop_columns([POSITION]).take(pa.array(np.argsort(rows)))


def _spark_answer(
    spark: Any, fs: Any, repo: FeatureRepo, labels: Any, fm_version: FMVersion | None,
    item_features: list[str], made: list[str],
) -> Any:
    """Feast's point-in-time join for Spark label rows `labels` (user_id, item_id as whole
    numbers, event_timestamp a timestamp, POSITION): a lazy Spark DataFrame of POSITION, then
    `item_features`, then `embedding` (null where no TAE is in range). One row per label row
    if Feast answered right: the caller checks."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType

    views, refs, renames = [], [], {}
    if item_features:
        view = fs.get_feature_view(ITEM_VIEW)
        _check_features(view, item_features)
        views.append(_spark_view(spark, view, [repo.data / "items.parquet"], ["item_id"],
                                 item_features, made))
        refs += [f"{ITEM_VIEW}:{c}" for c in item_features]
        renames.update({f"{ITEM_VIEW}__{c}": c for c in item_features})
    no_taes = False
    if fm_version is not None:
        view = fs.get_feature_view(view_name(fm_version.version))
        files = _offline_files(repo.tae_dir(fm_version.version) / "*" / "*.parquet")
        if files:
            views.append(_spark_view(spark, view, files, ["user_id", "item_id"], [EMBEDDING], made))
            refs.append(f"{view.name}:{EMBEDDING}")
            renames[f"{view.name}__{EMBEDDING}"] = EMBEDDING
        no_taes = not files
    if not views:
        answer = labels.select(POSITION)
    else:
        entity = labels.select(
            _key_text(F.col("user_id")).alias("user_id"), _key_text(F.col("item_id")).alias("item_id"),
            F.col(EVENT_TIMESTAMP).cast("timestamp_ntz").alias(EVENT_TIMESTAMP), POSITION,
        )
        with warnings.catch_warnings():  # "the spark offline store is an experimental feature"
            warnings.simplefilter("ignore", RuntimeWarning)
            # What FeatureStore.get_historical_features calls once it has looked the views up
            # in the registry, called directly to pass the copies with foundex's sources.
            job = fs.provider.get_historical_features(
                config=fs.config, feature_views=views, feature_refs=refs, entity_df=entity,
                registry=fs.registry, project=fs.project, full_feature_names=True,
            )
            answer = job.to_spark_df()  # Feast's statements are parsed here, under its setting
        spark.conf.set(_QUOTED_REGEX, _CALL_CONF[_QUOTED_REGEX])
        answer = answer.select(POSITION, *[F.col(k).alias(v) for k, v in renames.items()])
    if no_taes:
        answer = answer.withColumn(EMBEDDING, F.lit(None).cast(ArrayType(FloatType())))
    return answer


def _key_text(col: Any) -> Any:
    """A join key as text ending in KEY_END: "12/" and "3/" never concatenate to what "1/" and
    "23/" do (see the module doc)."""
    from pyspark.sql import functions as F

    return F.concat(col.cast("bigint").cast("string"), F.lit(KEY_END))


def _spark_view(
    spark: Any, view: Any, files: list[Path], keys: list[str], features: list[str],
    made: list[str],
) -> Any:
    """An unregistered copy of `view` whose source is a temporary Spark view of `files`:
    `keys` as text (`_key_text`), the time, `features`, and ORDER, the tie-break."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
    from pyspark.sql import functions as F

    df = _read_parquet(spark, files)
    order = F.timestamp_micros((_file_rank(df, files) * F.lit(1 << _ROW_BITS)) + F.col(_ROW))
    table = f"foundex_{view.name}_{uuid.uuid4().hex[:12]}"
    df.select(*[_key_text(F.col(k)).alias(k) for k in keys], EVENT_TIMESTAMP, *features,
              order.alias(ORDER)).createOrReplaceTempView(table)
    made.append(table)
    copy = view.__copy__()
    with warnings.catch_warnings():  # "the spark data source API is an experimental feature"
        warnings.simplefilter("ignore", RuntimeWarning)
        copy.batch_source = SparkSource(name=table, table=table, timestamp_field=EVENT_TIMESTAMP,
                                        created_timestamp_column=ORDER)
    return copy


def _file_rank(df: Any, files: list[Path]) -> Any:
    """A column: the position in `files` (the in-memory join's file order) of the file each
    row of `df` comes from. Raises FeastJoinError if Spark reads a file not in `files`."""
    from pyspark.sql import functions as F

    if len(files) == 1:
        return F.lit(0)
    rank = {f.resolve(): k for k, f in enumerate(files)}
    pairs = []
    # Spark's own spelling of each path (one pass over the files' metadata), so the lookup
    # below matches whatever it escapes.
    for (uri,) in df.select(_FILE).distinct().collect():
        path = Path(unquote(urlparse(uri).path)).resolve()
        if path not in rank:
            raise FeastJoinError(f"Spark read {uri}, which the offline glob does not list")
        pairs += [F.lit(uri), F.lit(rank[path])]
    return F.element_at(F.create_map(*pairs), F.col(_FILE))


def _read_parquet(spark: Any, files: list[Path]) -> Any:
    """Spark's read of parquet `files` (one schema, the first file's), with each row's file
    (_FILE, as Spark spells it) and row number in it (_ROW). Nanosecond timestamp columns come
    back as microsecond ones (floored; naive stays naive), as the in-memory join reads them."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(*[str(f) for f in files])
    ns = {f.name: f.type.tz is not None for f in pq.read_schema(files[0])
          if pa.types.is_timestamp(f.type) and f.type.unit == "ns"}
    cols = []
    for name in df.columns:
        col = df[_quoted(name)]
        if name in ns:  # int64 nanoseconds (_CALL_CONF): floored to microseconds, in integers
            q = _quoted(name)
            col = F.timestamp_micros(F.expr(f"({q} - pmod({q}, 1000)) div 1000"))
            col = col if ns[name] else col.cast("timestamp_ntz")
        cols.append(col.alias(name))
    return df.select(*cols, F.col("_metadata.file_path").alias(_FILE),
                     F.col("_metadata.row_index").alias(_ROW))


# ---------------------------------------------------------------------------------------------
# Spark: parquet in, parquet out


def feast_training_set_parts(
    fs: Any,
    repo: FeatureRepo,
    labels_path: Path,
    out_dir: Path,
    fm_version: FMVersion | None,
    item_features: list[str] = ITEM_FEATURES,
    *,
    overwrite: bool = False,
) -> FeastParts:
    """The training set of `feast_training_set`, read and written by Spark: label rows from
    the parquet file `labels_path`, the rows out as `out_dir/part-NNNNN.parquet` in input
    order, `label_row` (the row's position in the input file) last; `fs` must be configured
    with Feast's Spark store.

    Columns as `feast_training_set`'s frame, with `embedding` a list<float32> column (null
    where none) and label columns of their parquet types (a stored pandas index dropped). The
    driver holds no rows: Spark reads, joins (Feast's answer kept on its executors' disks
    while it is checked) and writes. `event_timestamp` must be a timestamp column (a naive
    one is UTC; ISO text is refused). Raises ValueError (not a Spark store, a bad label file or
    label rows: the in-memory path's messages, with input row numbers), FileExistsError
    (`out_dir` exists and not `overwrite`), and `feast_training_set`'s errors. On any error
    nothing is left at `out_dir` (an earlier one stays)."""
    from pyspark import StorageLevel

    labels_path, out_dir = Path(labels_path), Path(out_dir)
    if not _is_spark(fs):
        raise ValueError("parquet in and out through Feast needs Feast's Spark offline store "
                         f"(`offline_store: type: spark`); this repo's is {offline_store_kind(fs)}")
    if not labels_path.is_file():
        raise ValueError(f"label rows: {labels_path} is not a parquet file")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"training-set output {out_dir} exists; choose a new directory")
    names = label_columns(pq.read_schema(labels_path))
    if POSITION in names:
        raise ValueError(f"label rows hold a column named {POSITION!r}, which the output uses "
                         "for itself; rename it")
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        with spark_session(fs) as spark, _temp_views(spark) as made:
            raw = _read_parquet(spark, [labels_path])
            labels = raw.select(*[raw[_quoted(n)] for n in names], raw[_ROW].alias(POSITION))
            labels, n, note = _checked_labels(labels)
            if n:
                answer = _spark_answer(spark, fs, repo, labels, fm_version, item_features, made)
            else:  # Feast cannot take an empty entity frame; typed empty columns instead
                answer = _empty_answer(spark, repo, labels, fm_version, item_features)
            answer = answer.persist(StorageLevel.DISK_ONLY)
            try:
                without, widen = _answer_stats(answer, n, item_features, fm_version is not None)
                out = _output(labels, answer, names, item_features, widen)
                out.orderBy(POSITION).write.parquet(str(tmp))
            finally:
                answer.unpersist()
        files = _tidy_parts(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeastParts(out_dir, n, without, [out_dir / f.name for f in files], note)


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _checked_labels(labels: Any) -> tuple[Any, int, str | None]:
    """The label rows checked by the in-memory path's rules, in Spark (one aggregate):
    -> (rows with `event_timestamp` as a UTC timestamp, how many, the naive-times note or
    None). Raises ValueError naming the first bad input row."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    types = {f.name: f.dataType for f in labels.schema.fields}
    for col in ("user_id", "item_id", EVENT_TIMESTAMP):
        if col not in types:
            raise ValueError(f"label rows lack column {col!r}")
    row = F.col(POSITION)
    checks: dict[str, Any] = {"n": F.count(F.lit(1))}
    for col in ("user_id", "item_id"):
        kind, x = types[col], F.col(col)
        if isinstance(kind, T.FractionalType):
            x = x.cast("double")
            bad = x.isNull() | F.isnan(x) | (x != F.floor(x)) | (F.abs(x) == float("inf"))
        elif isinstance(kind, T.IntegralType):
            bad = x.isNull()  # pandas reads such a column as floats: "got nan"
        else:
            raise ValueError(f"{col} must hold integer ids, got {kind.simpleString()}")
        checks[f"{col}_bad"] = F.min(F.when(bad, row))
    kind, note = types[EVENT_TIMESTAMP], None
    if isinstance(kind, T.TimestampNTZType):
        note = f"{EVENT_TIMESTAMP} has no time zone; its times are taken as UTC"
    elif isinstance(kind, T.NumericType | T.BooleanType):
        raise ValueError(
            f"{EVENT_TIMESTAMP} holds numbers ({kind.simpleString()}), not timestamps; epoch "
            "numbers are refused because their unit is ambiguous: convert them, e.g. "
            "pd.to_datetime(col, unit='s', utc=True)")
    elif not isinstance(kind, T.TimestampType):
        raise ValueError(
            f"{EVENT_TIMESTAMP} holds {kind.simpleString()} values; label rows read by Spark "
            "need a timestamp column: convert it, e.g. pd.to_datetime(col, utc=True)")
    labels = labels.withColumn(EVENT_TIMESTAMP, F.col(EVENT_TIMESTAMP).cast("timestamp"))
    us = F.unix_micros(F.col(EVENT_TIMESTAMP))
    checks["ts_null"] = F.sum(F.col(EVENT_TIMESTAMP).isNull().cast("long"))
    checks["ts_null_row"] = F.min(F.when(F.col(EVENT_TIMESTAMP).isNull(), row))
    out_of_range = (us < EARLIEST_US) | (us >= LATEST_US)
    checks["ts_out"] = F.sum(out_of_range.cast("long"))
    checks["ts_out_row"] = F.min(F.when(out_of_range, row))
    got = labels.agg(*[v.alias(k) for k, v in checks.items()]).first().asDict()
    n = int(got["n"])
    _raise_bad_labels(labels, got, n)
    return labels, n, note


def _raise_bad_labels(labels: Any, got: dict[str, Any], n: int) -> None:
    """The first problem `_checked_labels`' aggregate found, as the in-memory path says it."""
    from pyspark.sql import functions as F

    def value_at(col: str, row: int) -> Any:
        return labels.filter(F.col(POSITION) == row).select(col).first()[0]

    for col in ("user_id", "item_id"):
        if (r := got[f"{col}_bad"]) is not None:
            v = value_at(col, r)
            raise ValueError(f"{col} must hold whole numbers, got "
                             f"{float('nan') if v is None else float(v)!r} (row {r})")
    if got["ts_null"]:
        raise ValueError(f"{EVENT_TIMESTAMP} is missing on {int(got['ts_null']):,} of {n:,} rows "
                         f"(first: row {got['ts_null_row']})")
    if got["ts_out"]:
        r = got["ts_out_row"]
        us = labels.filter(F.col(POSITION) == r).select(F.unix_micros(EVENT_TIMESTAMP)).first()[0]
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
        raise ValueError(
            f"{EVENT_TIMESTAMP} {when.isoformat()} (row {r}) is outside the supported range "
            f"1970-01-01 .. 2262-04-10 UTC ({int(got['ts_out']):,} of {n:,} rows)")


def _empty_answer(
    spark: Any, repo: FeatureRepo, labels: Any, fm_version: FMVersion | None,
    item_features: list[str],
) -> Any:
    """The answer's columns, typed, for no label rows."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType

    cols = [F.col(POSITION)]
    if item_features:
        schema = spark.read.parquet(str(repo.data / "items.parquet")).schema
        cols += [F.lit(None).cast(schema[c].dataType).alias(c) for c in item_features]
    if fm_version is not None:
        cols.append(F.lit(None).cast(ArrayType(FloatType())).alias(EMBEDDING))
    return labels.select(*cols)


def _answer_stats(
    answer: Any, n: int, item_features: list[str], embeddings: bool
) -> tuple[int | None, bool]:
    """Check Feast's (persisted) answer holds each of the `n` label rows once -> (rows without
    an embedding or None, whether item features widen to float64: some row has none).
    Raises FeastJoinError."""
    from pyspark.sql import functions as F

    def nulls(c: str) -> Any:
        return F.sum(F.col(c).isNull().cast("long"))

    aggs = {"rows": F.count(F.lit(1)), "distinct": F.count_distinct(POSITION)}
    aggs.update({f"null_{c}": nulls(c) for c in item_features})
    if embeddings:
        aggs["null_embedding"] = nulls(EMBEDDING)
    got = answer.agg(*[v.alias(k) for k, v in aggs.items()]).first().asDict()
    if got["rows"] != n or got["distinct"] != n:
        raise FeastJoinError(
            f"Feast's spark offline store answered {got['rows']:,} rows ({got['distinct']:,} "
            f"distinct label rows) for {n:,} label rows")
    widen = any(got[f"null_{c}"] for c in item_features)
    return (int(got["null_embedding"] or 0) if embeddings else None), widen


def _output(labels: Any, answer: Any, names: list[str], item_features: list[str],
            widen: bool) -> Any:
    """The label columns with the answer's joined on (replacing a label column of the same
    name in place, as the in-memory frame does), POSITION last."""
    from pyspark.sql import functions as F

    new = [c for c in answer.columns if c != POSITION]
    answer = answer.select(POSITION, *[F.col(c).alias(f"__fx_new_{c}") for c in new])
    joined = labels.join(answer, on=POSITION, how="inner")

    def new_col(c: str) -> Any:
        col = F.col(f"__fx_new_{c}")
        return (col.cast("double") if widen and c in item_features else col).alias(c)

    cols = [new_col(c) if c in new else F.col(_quoted(c)) for c in names]
    cols += [new_col(c) for c in new if c not in names]
    return joined.select(*cols, POSITION)


def _tidy_parts(folder: Path) -> list[Path]:
    """Spark's output folder as foundex's: part-NNNNN.parquet in Spark's part order, nothing
    else (no _SUCCESS marker, no .crc checksum files)."""
    parts = sorted(p for p in folder.iterdir()
                   if p.name.startswith("part-") and p.name.endswith(".parquet"))
    for p in folder.iterdir():
        if p not in parts:
            p.unlink()
    named = [folder / f"part-{k:05d}.parquet" for k in range(len(parts))]
    for src, dst in zip(parts, named, strict=True):
        src.rename(dst)
    return named
