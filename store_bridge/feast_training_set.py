"""Training sets through Feast's own offline store (`foundex training-set --engine feast`).

The same rows as `training_set.expert_training_set` (the in-memory join), built by the offline
store that `feature_store.yaml` configures: DuckDB by default, Ray with `offline_store: type:
ray`. Each distinct (user, item, time) of the label rows goes to Feast's
`get_historical_features`, once for the pinned version's view (`fm_tae_<v>:embedding`) and
once for the `item_features` view, and the answers are put back into the in-memory join's
shape: every label row in input order, float32 arrays or None, item features typed alike.

Feast 0.67's Ray store departs from Feast's point-in-time rule (README, training-set section;
`tests/test_training_set_feast_engine.py` shows each). What this module does about it:
  * it ignores the view's TTL. Each view goes to it as an unregistered copy whose
    transformation also returns the matched row's own event time (`match_time`); the TTL is
    then applied here by Feast's rule (feature time + TTL >= row time).
  * it compares times in whole seconds (both sides are floored), so a row can get a feature
    logged later in the same second, or an earlier one of that second. The matched times are
    checked against the as-of over the offline rows' keys and times (`training_set`), and a
    mismatch is refused (FeastJoinError) rather than returned.
  * its broadcast join drops label rows that repeat a (user, item, time) when its
    `merge_asof` succeeds: each distinct one is asked once (the answer depends on nothing else).
  * a second view in the same call can fail on the first one's list column (ArrowInvalid):
    one call per view.
  * above `broadcast_join_threshold_mb` it takes a "windowed" join that only meets label and
    feature rows in the same block and time window (it matched no row in our test): the
    threshold is raised for the call, so the broadcast join (the view's whole table in the
    driver and Ray's object store) is always the one taken.

Ray starts locally (few CPUs, no dashboard, workers' output kept in Ray's log files) for the
call unless it runs already or a cluster is configured, and stops (or disconnects) after it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fm.timefeatures import arrow_timestamps_us, timestamps_us
from store_bridge.events.schema import EVENT_TIMESTAMP, ITEM_FEATURES
from store_bridge.feast_objects import ITEM_VIEW
from store_bridge.repo import FeatureRepo, FMVersion, view_name
from store_bridge.training_set import _key_column, _offline_files, asof_indices, label_timestamps

QUERY = "foundex_query"  # the id of a distinct (user, item, time) in Feast's answer
MATCH_TIME = "match_time"  # the matched feature row's own event time (Ray: see the module doc)
# Local Ray's CPUs unless `ray_conf: {num_cpus: ...}` says otherwise: enough for a join's few
# tasks, without claiming a shared machine.
LOCAL_RAY_CPUS = 2
_ALWAYS_BROADCAST_MB = 2**40  # see the module doc: the windowed join matches nothing
_NONE = np.iinfo(np.int64).min  # "no row matched", as a time


class FeastJoinError(RuntimeError):
    """Feast's offline store answered something that is not the point-in-time join: rows
    lost or repeated, or a row matched to another feature row than the rule's."""


def offline_store_kind(fs: Any) -> str:
    """'ray', 'duckdb', ...: the `type` of the store's `offline_store` config."""
    cfg = fs.config.offline_store
    return "ray" if _is_ray(cfg) else str(getattr(cfg, "type", type(cfg).__name__))


def _is_ray(cfg: Any) -> bool:
    return type(cfg).__name__ == "RayOfflineStoreConfig"


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
    with NaN when any row's item has no row at or before its time, else their parquet type.
    Raises ValueError (bad rows, an item feature the `item_features` view lacks, embeddings of
    mixed width), FeastJoinError (see the class), Feast's own errors (e.g. a view that was
    never applied)."""
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
            out["embedding"] = np.empty(0, dtype=object)
        return out
    distinct, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    query = pd.DataFrame({
        "user_id": distinct[:, 0], "item_id": distinct[:, 1],
        # Microseconds: Feast's DuckDB store refuses nanosecond times.
        EVENT_TIMESTAMP: pd.Series(distinct[:, 2].astype("datetime64[us]")).dt.tz_localize("UTC"),
        QUERY: np.arange(len(distinct), dtype=np.int64),
    })
    with offline_store_session(fs, repo):  # one Ray runtime for both calls
        items = taes = None
        if item_features:
            items = _answer(fs, fs.get_feature_view(ITEM_VIEW), item_features, query)
        if fm_version is not None:
            name = view_name(fm_version.version)
            taes = _answer(fs, fs.get_feature_view(name), ["embedding"], query)
    if items is not None:
        _check_matches(fs, items, [repo.data / "items.parquet"], ["item_id"], distinct)
        for c in item_features:
            out[c] = _item_column(items[f"{ITEM_VIEW}__{c}"], repo, c)[inverse]
    if taes is not None:
        files = _offline_files(repo.tae_dir(fm_version.version) / "*" / "*.parquet")
        matched = _check_matches(fs, taes, files, ["user_id", "item_id"], distinct)
        vectors = _vectors(taes[f"{name}__embedding"], name)
        if matched is not None:  # the store left the TTL to us: Feast's rule
            age = distinct[:, 2] - np.where(matched == _NONE, distinct[:, 2], matched)
            vectors[age > fm_version.ttl_seconds * 1_000_000] = None
        out["embedding"] = vectors[inverse]
    return out


def _store_applies_rule(fs: Any) -> bool:
    """Whether the store applies the TTL and microsecond times itself (DuckDB does)."""
    return not _is_ray(fs.config.offline_store)


def _answer(fs: Any, view: Any, features: list[str], query: pd.DataFrame) -> pd.DataFrame:
    """Feast's answer for `features` of `view` at the distinct label rows in `query`, within
    an `offline_store_session`: one row per QUERY id, in QUERY order; columns
    `<view>__<feature>` (and `<view>__match_time` where the store does not apply the rule
    itself)."""
    have = [f.name for f in view.features]
    if absent := [f for f in features if f not in have]:
        raise ValueError(f"features {absent} are not in Feast's {view.name} view (has: {have})")
    refs = [f"{view.name}:{f}" for f in features]
    if not _store_applies_rule(fs):
        view = _with_match_time(fs, view)
        refs.append(f"{view.name}:{MATCH_TIME}")
    with warnings.catch_warnings():
        # Feast's Ray store calls Ray Data APIs that Ray deprecates: not the caller's concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # The call FeatureStore.get_historical_features makes once it has looked the view up
        # in the registry, made directly so that a store's unregistered copy can be passed.
        job = fs.provider.get_historical_features(
            config=fs.config, feature_views=[view], feature_refs=refs, entity_df=query,
            registry=fs.registry, project=fs.project, full_feature_names=True,
        )
        answer = job.to_df()
    ids = answer[QUERY].to_numpy(np.int64) if QUERY in answer else np.empty(0, np.int64)
    if len(ids) != len(query) or not np.array_equal(np.sort(ids), query[QUERY].to_numpy()):
        raise FeastJoinError(
            f"Feast's {offline_store_kind(fs)} offline store answered {len(answer):,} rows "
            f"({len(np.unique(ids)):,} distinct) for {len(query):,} distinct label rows of "
            f"view {view.name}"
        )
    return answer.sort_values(QUERY, kind="stable").reset_index(drop=True)


def _with_match_time(fs: Any, view: Any) -> Any:
    """An unregistered copy of `view` whose transformation also returns each row's own event
    time as the feature `match_time`, for stores that leave the TTL to the caller."""
    from feast import BatchFeatureView, Field
    from feast.types import UnixTimestamp

    def add_match_time(batch: pd.DataFrame) -> pd.DataFrame:
        # Nested, so that it pickles by value: a Ray cluster need not have foundex installed.
        # Time order within a batch: rows that Feast's whole-second times make equal keep
        # the latest last, which is the one its de-duplication keeps.
        batch = batch.sort_values("event_timestamp", kind="stable")
        return batch.assign(match_time=batch["event_timestamp"])

    with warnings.catch_warnings():  # "Batch feature views are experimental"
        warnings.simplefilter("ignore", RuntimeWarning)
        return BatchFeatureView(
            name=view.name, mode="pandas", source=view.batch_source,
            entities=[fs.get_entity(e) for e in view.entities], ttl=view.ttl or timedelta(0),
            schema=[*view.features, Field(name=MATCH_TIME, dtype=UnixTimestamp)],
            udf=add_match_time,
        )


def _check_matches(
    fs: Any, answer: pd.DataFrame, files: list[Path], key_cols: list[str], distinct: np.ndarray
) -> np.ndarray | None:
    """Where the store does not apply the rule itself: the time (int64 us, _NONE: none) of the
    feature row Feast matched to each distinct label row, checked against the as-of over the
    `files`' key columns and times (the latest row at or before the label's time, no TTL).
    None for stores that apply the rule. Raises FeastJoinError on the first difference."""
    if _store_applies_rule(fs):
        return None
    view = next(c for c in answer.columns if c.endswith(f"__{MATCH_TIME}")).rsplit("__", 1)[0]
    t = pd.to_datetime(answer[f"{view}__{MATCH_TIME}"], utc=True)
    got = np.where(t.isna(), _NONE, timestamps_us(t.fillna(pd.Timestamp(0, tz="UTC"))))
    want = np.full(len(distinct), _NONE, dtype=np.int64)
    if files:
        table = pa.concat_tables(
            [pq.read_table(f, columns=[*key_cols, EVENT_TIMESTAMP]) for f in files]
        )
        times = arrow_timestamps_us(table.column(EVENT_TIMESTAMP))
        row_keys = [distinct[:, 0 if c == "user_id" else 1] for c in key_cols]
        hit = asof_indices([table.column(c).to_numpy() for c in key_cols], times, row_keys,
                           distinct[:, 2])
        want = np.where(hit >= 0, times[np.maximum(hit, 0)], _NONE)
    if (bad := np.flatnonzero(got != want)).size:
        k = bad[0]
        key = dict(zip(["user_id", "item_id"], distinct[k, :2].tolist(), strict=True))

        def when(us: int) -> str:
            return "no row" if us == _NONE else f"the row of {pd.Timestamp(us, unit='us', tz='UTC').isoformat()}"

        raise FeastJoinError(
            f"Feast's {offline_store_kind(fs)} offline store matched {when(got[k])} of {view} to "
            f"the label row {key} at {pd.Timestamp(distinct[k, 2], unit='us', tz='UTC').isoformat()}; "
            f"the point-in-time rule gives {when(want[k])} ({bad.size:,} of {len(distinct):,} "
            "distinct rows differ). Feast 0.67's Ray store compares times in whole seconds: "
            "use --engine foundex, or the DuckDB offline store"
        )
    return got


def _vectors(values: pd.Series, name: str) -> np.ndarray:
    """Feast's embedding column as an object array of read-only float32 vectors or None
    (None, NaN and the empty list all stand for "no match")."""
    out = np.full(len(values), None, dtype=object)
    widths = set()
    for k, v in enumerate(values):
        if v is None or (np.isscalar(v) and pd.isna(v)):
            continue
        vec = np.asarray(v, dtype=np.float32)
        if vec.size:
            vec.setflags(write=False)
            out[k] = vec
            widths.add(vec.size)
    if len(widths) > 1:
        raise ValueError(f"{name}: embeddings are not all of one dimension ({sorted(widths)})")
    return out


def _item_column(values: pd.Series, repo: FeatureRepo, column: str) -> np.ndarray:
    """As the in-memory join types it: float64 with NaN when any item had no row, else the
    column's type in items.parquet."""
    num = pd.to_numeric(values)
    as_float = num.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(as_float).any():
        return as_float
    schema = pq.read_schema(repo.data / "items.parquet")
    return num.to_numpy().astype(schema.field(column).type.to_pandas_dtype())


@contextmanager
def offline_store_session(fs: Any, repo: FeatureRepo) -> Iterator[None]:
    """What Feast's Ray store needs for one call, undone after it; nothing for other stores.

    Ray: a local runtime (`local_ray_options`) unless one runs already or a cluster is
    configured (`ray_address`, $RAY_ADDRESS, KubeRay: Feast connects itself), stopped (or
    disconnected) afterwards if this call began it; `storage_path` (the store refuses to run
    without one) defaults to data/ray_storage; the broadcast threshold is raised for the call
    (see the module doc)."""
    cfg = fs.config.offline_store
    if not _is_ray(cfg):
        yield
        return
    import ray
    from feast.infra.ray_initializer import shutdown_ray

    saved = {"storage_path": cfg.storage_path,
             "broadcast_join_threshold_mb": cfg.broadcast_join_threshold_mb}
    cfg.storage_path = cfg.storage_path or str(repo.data / "ray_storage")
    cfg.broadcast_join_threshold_mb = _ALWAYS_BROADCAST_MB
    began = not ray.is_initialized()
    cluster = (cfg.ray_address or os.environ.get("RAY_ADDRESS") or cfg.use_kuberay
               or (cfg.kuberay_conf or {}).get("cluster_name"))
    try:
        if began and not cluster:
            ray.init(**local_ray_options(cfg.ray_conf))
        yield
    finally:
        for key, value in saved.items():
            setattr(cfg, key, value)
        if began:
            shutdown_ray()  # Feast's: ray.shutdown() and its own "initialized" flag reset


def local_ray_options(ray_conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """`ray.init` arguments for a local runtime: LOCAL_RAY_CPUS CPUs, on loopback, no
    dashboard, workers' output and Ray's own messages kept out of the terminal (they go to
    Ray's session logs); `ray_conf` (feature_store.yaml's) overrides any of them."""
    return {
        "num_cpus": min(LOCAL_RAY_CPUS, os.cpu_count() or 1),
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "_node_ip_address": "127.0.0.1",
        **(ray_conf or {}),
    }
