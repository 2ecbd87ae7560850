"""Offline use-cases: log impressions' TAEs for every active version (`foundex log` and the
demo's logging stage), and build an expert's point-in-time training set."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid, NotFound, Unavailable

if TYPE_CHECKING:
    import pandas as pd

    from experts import ExpertConfig
    from fm import UserHistories
    from store_bridge.feast_training_set import FeastParts
    from store_bridge.logging_tier import LogReport
    from store_bridge.repo import FMVersion


def log_impressions(
    ctx: ServiceContext,
    impressions: pd.DataFrame,
    *,
    versions: Iterable[FMVersion] | None = None,
    histories: UserHistories | None = None,
    progress: bool = True,
    chunk_rows: int = 20000,
    on_report: Callable[[LogReport], None] | None = None,
    checked: bool = False,
) -> list[LogReport]:
    """TAEs of `impressions` (rows of user_id, item_id, event_timestamp, surface; validated
    here by `check_impressions`) for each of `versions` (default: every active one), written
    offline (parquet) and online (ctx.store). `histories` default to the repo's event log.
    `on_report` is called with each version's LogReport as it finishes. `progress`: draw
    progress bars (callers pass it only when stderr is a terminal). `checked`: `impressions`
    is what `check_impressions` returned already (the CLI checks before Redis starts), so the
    rows are not validated twice.

    Raises Invalid (bad rows), Conflict (no active version, no event log, an FM producing
    NaN/Inf), StoreUnavailable (Redis does not answer; finished chunks stay, a rerun resumes)."""
    from store_bridge.fm_tier import load_tae_function, repo_histories
    from store_bridge.logging_tier import BadEmbeddings, log_version

    imp = impressions if checked else check_impressions(ctx, impressions, histories=histories)
    todo = list(versions) if versions is not None else ctx.manifest().active()
    if not todo:
        raise Conflict("no active FM version to log")
    if histories is None:
        histories = repo_histories(ctx.repo)
        if histories is None:
            raise Conflict(f"no event log (events.parquet and spec.json) in {ctx.repo.events_dir}")
    reports = []
    for entry in todo:
        try:
            rep = log_version(ctx.repo, ctx.store, entry.version,
                              load_tae_function(ctx.repo, entry, histories), imp,
                              progress=progress, chunk_rows=chunk_rows)
        except BadEmbeddings as e:  # the FM's fault, not the rows': Conflict
            raise Conflict(str(e)) from e
        reports.append(rep)
        if on_report is not None:
            on_report(rep)
    return reports


def check_impressions(
    ctx: ServiceContext,
    impressions: pd.DataFrame,
    *,
    histories: UserHistories | None = None,
    on_note: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """The impressions validated and normalised (`prepare_impressions`), without torch,
    Feast or Redis: cheap enough to run before anything heavy starts.

    Surfaces are checked against `histories.surfaces`, else the dataset spec's (spec.json):
    every FM version that loads shares them (`load_engine` refuses one that does not).
    `on_note` hears remarks (naive times taken as UTC). Raises Invalid (bad rows), Conflict
    (no dataset spec to know the surfaces from)."""
    from store_bridge.events.schema import DatasetSpec
    from store_bridge.logging_tier import prepare_impressions

    if histories is not None:
        surfaces = list(histories.surfaces)
    else:
        spec_path = ctx.repo.events_dir / "spec.json"
        if not spec_path.is_file():
            raise Conflict(f"no event log (events.parquet and spec.json) in {ctx.repo.events_dir}")
        surfaces = DatasetSpec.load(spec_path).surfaces
    try:
        return prepare_impressions(impressions, surfaces, on_note=on_note)
    except ValueError as e:
        raise Invalid(str(e)) from e


@dataclass
class TrainingPlan:
    """An expert whose pin passed the checks: `entry` is the active version it pins (None for
    the no-FM baseline)."""

    expert: ExpertConfig
    entry: FMVersion | None


@dataclass
class TrainingSet:
    frame: pd.DataFrame  # label rows + `embedding` (float32 arrays or None) + item features
    note: str | None  # e.g. naive timestamps taken as UTC

    @property
    def without_embedding(self) -> int:
        f = self.frame
        return int(f["embedding"].isna().sum()) if "embedding" in f else 0


def plan_training_set(ctx: ServiceContext, expert: str) -> TrainingPlan:
    """The checks before any label row is read: the expert exists, the version it pins is
    published and active (a retired version's TAEs are not logged on), its item features are
    there. Raises NotFound (unknown expert), Conflict (a bad pin, no item features, an
    unreadable expert config)."""
    from experts import ExpertConfigError
    from store_bridge.versions import PinError

    try:
        configs = ctx.expert_configs()
    except ExpertConfigError as e:  # the repo's files are wrong, not the caller's input
        raise Conflict(str(e)) from e
    if expert not in configs:
        raise NotFound(f"unknown expert {expert!r} (known: {', '.join(sorted(configs)) or 'none'})")
    cfg = configs[expert]
    entry = None
    if cfg.fm_version:
        try:
            entry = ctx.registry().check_pin(cfg.fm_version)
        except PinError as e:
            raise Conflict(f"expert {expert} {e}; re-pin it to an active version") from e
    items = ctx.repo.data / "items.parquet"
    if cfg.item_features and not items.is_file():
        raise Conflict(f"item features not found: {items} (expert {expert} reads "
                       f"{', '.join(cfg.item_features)})")
    return TrainingPlan(cfg, entry)


# Who joins: "foundex" (the in-memory NumPy join) or "feast" (Feast's get_historical_features on
# the offline store feature_store.yaml configures: DuckDB by default, Spark when set).
ENGINES = ("foundex", "feast")


def build_training_set(
    ctx: ServiceContext, plan: TrainingPlan, labels: pd.DataFrame, *,
    on_note: Callable[[str], None] | None = None,
    engine: str = "foundex",
) -> TrainingSet:
    """The expert's point-in-time-correct training set from label rows (user_id, item_id,
    event_timestamp, one numeric column per task): the pinned version's TAEs (latest at or
    before each row, within TTL) and the item features. `on_note` hears remarks on the rows
    (naive times taken as UTC) before the join. `engine` (see ENGINES): both give the same
    rows. Raises Invalid for bad label rows or an unknown engine; with "feast", Conflict when
    the repo's Feast registry lacks the views (run `feast apply`) or Feast's offline store
    answers something that is not a point-in-time join, Unavailable when it cannot be
    reached."""
    from store_bridge.events.schema import EVENT_TIMESTAMP
    from store_bridge.training_set import (
        check_label_columns,
        expert_training_set,
        label_timestamps,
    )

    if engine not in ENGINES:
        raise Invalid(f"unknown training-set engine {engine!r} (choose from: {', '.join(ENGINES)})")
    cfg = plan.expert
    try:
        check_label_columns(labels, cfg.tasks)
        labels[EVENT_TIMESTAMP], note = label_timestamps(labels[EVENT_TIMESTAMP])
        if note and on_note is not None:
            on_note(note)
        if engine == "feast":
            frame = _feast_training_set(ctx, plan, labels)
        else:
            frame = expert_training_set(ctx.repo, labels, plan.entry, cfg.item_features)
    except ValueError as e:
        raise Invalid(str(e)) from e
    return TrainingSet(frame, note)


def _feast_training_set(ctx: ServiceContext, plan: TrainingPlan, labels: pd.DataFrame) -> pd.DataFrame:
    """The "feast" engine: ctx's FeatureStore, its errors as domain errors."""
    from store_bridge.feast_training_set import feast_training_set

    with _feast_errors(ctx):
        return feast_training_set(ctx.feature_store, ctx.repo, labels, plan.entry,
                                  plan.expert.item_features)


def feast_offline_store(ctx: ServiceContext) -> str:
    """The offline store the "feast" engine runs on, as feature_store.yaml names it: 'duckdb'
    (the default), 'spark', ..."""
    from store_bridge.feast_training_set import offline_store_kind

    return offline_store_kind(ctx.feature_store)


def write_feast_training_set_parts(
    ctx: ServiceContext, plan: TrainingPlan, entities: Path, out_dir: Path, *,
    on_note: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> FeastParts:
    """The "feast" engine with parquet in and out, on Feast's Spark offline store: Spark reads
    the label rows from `entities`, joins, and writes `out_dir` as parquet parts
    (`part-NNNNN.parquet`, rows in input order, `label_row` last); no row passes through this
    process. `on_note` hears the naive-times note. `overwrite`: replace an existing `out_dir`.

    Raises Invalid (an unreadable label file, bad label rows or columns, an offline store other
    than Spark, `out_dir` exists without `overwrite`), and Conflict / Unavailable as
    `build_training_set`'s "feast" engine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from store_bridge.events.schema import EVENT_TIMESTAMP
    from store_bridge.feast_training_set import feast_training_set_parts
    from store_bridge.training_set import check_label_columns

    try:
        schema = pq.read_schema(entities)
    except (OSError, pa.ArrowException) as e:
        raise Invalid(f"{entities}: not a readable parquet file ({type(e).__name__})") from e
    ts = schema.field(EVENT_TIMESTAMP).type if EVENT_TIMESTAMP in schema.names else None
    if ts is not None and not pa.types.is_timestamp(ts):  # before a JVM starts, not after
        numeric = pa.types.is_integer(ts) or pa.types.is_floating(ts)
        kind = "numbers" if numeric else f"{ts} values"
        raise Invalid(f"{EVENT_TIMESTAMP} holds {kind}; label rows read by Spark need a "
                      "timestamp column: convert it, e.g. pd.to_datetime(col, utc=True) "
                      "(ISO 8601 text works with --engine foundex)")
    try:
        check_label_columns(schema.empty_table().to_pandas(), plan.expert.tasks)
        with _feast_errors(ctx):
            result = feast_training_set_parts(
                ctx.feature_store, ctx.repo, entities, out_dir, plan.entry,
                plan.expert.item_features, overwrite=overwrite)
    except (ValueError, FileExistsError) as e:
        raise Invalid(str(e)) from e
    if result.time_note and on_note is not None:
        on_note(result.time_note)
    return result


@contextmanager
def _feast_errors(ctx: ServiceContext) -> Iterator[None]:
    """Errors of the "feast" engine as domain errors (ValueError passes: bad label rows)."""
    from feast.errors import FeastObjectNotFoundException
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    from store_bridge.feast_training_set import FeastJoinError

    try:
        yield
    except FeastObjectNotFoundException as e:
        raise Conflict(f"{e}; run `feast apply` in {ctx.repo.path}") from e
    except FeastJoinError as e:
        raise Conflict(str(e)) from e
    except ConnectionError as e:  # Spark did not start (no Java), a cluster that does not answer
        raise Unavailable(f"Feast's offline store: {e}") from e
    except (PySparkException, Py4JError) as e:  # e.g. an offline file Spark cannot read
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise Conflict(f"Feast's spark offline store failed: {first}") from e
