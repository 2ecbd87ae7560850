"""The logging tier as a stream: builders of the `logging` and `join` consumer roles
(`foundex consume logging|join`), over the context's streams, store and online histories.

`logging` (impressions stream) writes the TAEs of every active FM version as of each served
impression's request time, offline and online, and records the impression as open; `join`
(events stream) joins open impressions with their feedback within `settings.join_window_s`
into expert training rows under `data/training_rows/` (`read_training_rows` loads them). See
`store_bridge.streams.impressions` for the guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.services.context import ServiceContext
from api.services.errors import Conflict

if TYPE_CHECKING:
    import pandas as pd

    from store_bridge.events.schema import DatasetSpec
    from store_bridge.streams.impressions import (
        FeedbackJoinConsumer,
        ImpressionLogConsumer,
        OpenImpressions,
    )

# Open impressions outlive their window by this much (wall clock) before Redis expires them:
# room for a join consumer that lags or restarts. One that lags more loses them (counted).
JOIN_SLACK_S = 600.0


def open_impressions(ctx: ServiceContext) -> OpenImpressions:
    """Where the logging consumer records logged impressions for the join (Redis)."""
    from store_bridge.streams.impressions import OpenImpressions

    return OpenImpressions(
        ctx.client, ctx.repo.project, window_s=ctx.settings.join_window_s, slack_s=JOIN_SLACK_S
    )


def build_logging_consumer(ctx: ServiceContext, consumer: str | None = None) -> ImpressionLogConsumer:
    """The `logging` role: served impressions -> TAEs of every active version (parquet and
    Redis) and open impressions for the join. Its batches wait until the `histories` role has
    handled the events appended before them (a TAE as of the request time needs them).
    Raises Conflict when the repo has no dataset spec (the online histories need it)."""
    from store_bridge.streams.impressions import ImpressionLogConsumer, StreamGate

    return ImpressionLogConsumer(
        ctx.impressions_stream, ctx.repo, ctx.store, ctx.histories,
        opens=open_impressions(ctx), gate=StreamGate(ctx.events_stream, "histories"),
        consumer=consumer,
    )  # fmt: skip


def build_join_consumer(ctx: ServiceContext, consumer: str | None = None) -> FeedbackJoinConsumer:
    """The `join` role: events joined with the open impressions they are feedback for, and
    impressions whose window passed swept out with labels 0, as expert training rows. Its
    group is created at the end of the events stream ("$") when it first starts; its batches
    wait until the `logging` role has handled the impressions appended before them. Raises
    Conflict when the repo has no dataset spec (the label columns come from it)."""
    from store_bridge.streams.impressions import FeedbackJoinConsumer, StreamGate

    return FeedbackJoinConsumer(
        ctx.events_stream, ctx.repo, open_impressions(ctx), _spec(ctx),
        gate=StreamGate(ctx.impressions_stream, "logging"), consumer=consumer,
    )  # fmt: skip


def training_rows(
    ctx: ServiceContext, *, start: str | None = None, end: str | None = None
) -> pd.DataFrame:
    """The join's expert training rows (request days start..end, `YYYY-MM-DD`, inclusive)."""
    from store_bridge.streams.impressions import read_training_rows

    return read_training_rows(ctx.repo, start=start, end=end)


def _spec(ctx: ServiceContext) -> DatasetSpec:
    from store_bridge.events.schema import DatasetSpec

    path = ctx.repo.events_dir / "spec.json"
    if not path.is_file():
        raise Conflict(f"no dataset spec at {path}: run `foundex demo` or load a dataset")
    try:
        return DatasetSpec.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise Conflict(f"dataset spec {path} does not load: {e}") from None
