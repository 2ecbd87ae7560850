"""The stream consumer roles `foundex consume <role>` runs: role name -> how to build it.

A role is a `store_bridge.streams.consumer.StreamConsumer` over one of the context's streams.
To add one, write a builder `(ctx, consumer_name) -> StreamConsumer` and put it in ROLES.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid

if TYPE_CHECKING:
    from store_bridge.streams.consumer import StreamConsumer


def _histories(ctx: ServiceContext, consumer: str | None) -> StreamConsumer:
    """Every event into its user's online history (Redis)."""
    from store_bridge.streams.histories import HistoriesConsumer

    return HistoriesConsumer(ctx.events_stream, ctx.histories, consumer=consumer)


def _offline(ctx: ServiceContext, consumer: str | None) -> StreamConsumer:
    """Every event into the date-partitioned parquet log under data/events/live."""
    from api.services.events import dataset_spec
    from store_bridge.streams.offline_log import OfflineLogBusy, OfflineLogConsumer

    spec = dataset_spec(ctx)
    try:
        return OfflineLogConsumer(ctx.events_stream, live_log_dir(ctx), spec.all_tasks,
                                  consumer=consumer)  # fmt: skip
    except OfflineLogBusy as e:
        raise Conflict(str(e)) from None


def _logging(ctx: ServiceContext, consumer: str | None) -> StreamConsumer:
    """Served impressions -> TAEs of every active version as of the request time."""
    from api.services.impression_log import build_logging_consumer

    return build_logging_consumer(ctx, consumer)


def _join(ctx: ServiceContext, consumer: str | None) -> StreamConsumer:
    """Feedback events joined to their impressions -> expert training rows."""
    from api.services.impression_log import build_join_consumer

    return build_join_consumer(ctx, consumer)


Builder = Callable[[ServiceContext, "str | None"], "StreamConsumer"]
ROLES: dict[str, Builder] = {
    "histories": _histories,
    "offline": _offline,
    "logging": _logging,
    "join": _join,
}


def live_log_dir(ctx: ServiceContext) -> Path:
    """The offline event log the `offline` role writes: <repo>/data/events/live."""
    return ctx.repo.events_dir / "live"


def check_role(role: str) -> None:
    """Invalid naming the roles unless `role` is one (cheap: call it before Redis starts)."""
    if role not in ROLES:
        raise Invalid(f"unknown consumer role {role!r} (roles: {', '.join(ROLES)})")


def build_consumer(ctx: ServiceContext, role: str, *, consumer: str | None = None) -> StreamConsumer:
    """The consumer of `role` (named `consumer` within its group; default: the group's name,
    so a restarted single consumer resumes its own pending entries). Raises Invalid (unknown
    role), Conflict (no dataset spec; the offline log's folder held by another consumer)."""
    check_role(role)
    return ROLES[role](ctx, consumer)
