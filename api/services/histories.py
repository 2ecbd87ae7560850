"""Online histories as a use-case: seed them from the repo's event log.

The FM serving tier reads each user's recent history from Redis (`ctx.histories`), kept
current by the `histories` stream consumer. A repo whose events were written as a file (the
demo, a loaded dataset) seeds them once from that file before anything serves.
"""

from __future__ import annotations

from api.services.context import ServiceContext
from api.services.errors import Conflict


def backfill_histories(ctx: ServiceContext) -> int:
    """Seed the online histories from `<repo>/data/events/events.parquet`: each user's newest
    `settings.history_cap` events -> history rows newly added (0 on a second run: idempotent;
    where the log carries event ids, events the stream already delivered are not added twice).

    Reads the log's history columns whole (about 40 bytes per event). Raises Conflict when the
    repo has no dataset spec or no event log, or the log lacks a column a history row needs;
    ValueError for a surface outside the spec; redis errors."""
    import pyarrow.parquet as pq  # Arrow loads only when a command gets this far

    from store_bridge.events.schema import EVENT_TIMESTAMP
    from store_bridge.streams.records import EVENT_ID

    histories = ctx.histories  # Conflict without a dataset spec
    path = ctx.repo.events_dir / "events.parquet"
    if not path.is_file():
        raise Conflict(f"no event log at {path}: run `foundex demo` or load a dataset")
    names = set(pq.read_schema(path).names)
    needed = ["user_id", "item_id", EVENT_TIMESTAMP, "surface", "action"]
    lacking = [c for c in needed if c not in names]
    if lacking:
        raise Conflict(f"event log {path} lacks columns {lacking}")
    # The event id where the log carries one; else each row's id is derived from its content,
    # as the stream's producers derive it, so a replayed event is still one history row.
    columns = needed + ([EVENT_ID] if EVENT_ID in names else [])
    events = pq.read_table(path, columns=columns).to_pandas()
    return histories.backfill(events)
