"""Freshness: keep a published FM version training on the live event stream
(`foundex fm train --follow VERSION`; the mechanics are store_bridge.streams.fm_follow's).

The follower trains request-shaped batches with progressive validation, checkpoints every
K steps with its stream position under data/fm_follow/<version>/, resumes after a crash with
no event trained twice and none skipped, and publishes weight-sync updates every S steps
(data/fm_sync/<version>/ and the announcement stream) that serving and logging can follow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid

if TYPE_CHECKING:
    from store_bridge.streams.fm_follow import FMFollower, FollowStep


@dataclass
class FollowOptions:
    """The follower's cadences (steps) and limits; `check` names the first bad one."""

    checkpoint_every: int = 100  # steps between checkpoints (entries are acked only after one)
    sync_every: int = 50  # steps between sync updates (0: no sync)
    snapshot_every: int = 10  # every F-th sync update is a full snapshot
    sync_fraction: float = 0.3  # share of the weights' bytes a delta may ship
    max_steps: int | None = None  # stop at this trainer step count (resumed steps included)
    once: bool = False  # train what the stream holds now (the tail too), then stop

    def check(self) -> None:
        """Raises Invalid naming the first bad option (cheap: before Redis or torch)."""
        if self.checkpoint_every < 1:
            raise Invalid(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.sync_every < 0:
            raise Invalid(f"--sync-every must be >= 0 (0: no sync), got {self.sync_every}")
        if self.snapshot_every < 1:
            raise Invalid(f"--snapshot-every must be >= 1, got {self.snapshot_every}")
        if not 0 < self.sync_fraction <= 1:
            raise Invalid(f"--sync-fraction must be in (0, 1], got {self.sync_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise Invalid(f"--max-steps must be >= 1, got {self.max_steps}")


@dataclass
class FollowReport:
    """What one follow run did."""

    version: str
    steps: int  # the trainer's step count at the end (resumed steps included)
    events: int  # rows trained by this run
    entries: int  # stream entries consumed by this run
    position: str  # the last entry trained
    ne: dict[str, float]  # progressive NE per FM task since the follow run first started
    sync_seq: int | None  # the last published sync seq (None: sync off)
    checkpoint: str | None  # the newest checkpoint


def open_follow(
    ctx: ServiceContext,
    version: str,
    options: FollowOptions,
    on_step: Callable[[FollowStep], None] | None = None,
) -> FMFollower:
    """The follower of `version`, resumed or started (store_bridge.streams.fm_follow).

    Raises Invalid (bad options), NotFound (no such version), Conflict (a retired version,
    a repo without a dataset spec, a follow checkpoint that belongs to another run, a
    checkpoint that does not load)."""
    options.check()
    entry = ctx.version(version)
    if entry.status != "active":
        actives = ", ".join(v.version for v in ctx.manifest().active()) or "none"
        raise Conflict(f"FM version {version} is {entry.status}: only an active version can be "
                       f"followed (active: {actives})")  # fmt: skip
    histories = ctx.histories  # Conflict without a dataset spec
    from store_bridge.streams.fm_follow import open_follower

    try:
        return open_follower(
            ctx.repo, entry, ctx.events_stream, histories,
            checkpoint_every=options.checkpoint_every, sync_every=options.sync_every,
            snapshot_every=options.snapshot_every, sync_fraction=options.sync_fraction,
            max_steps=options.max_steps, on_step=on_step,
        )  # fmt: skip
    except ValueError as e:  # CheckpointError, another run's checkpoint
        raise Conflict(str(e)) from None


def follow(
    ctx: ServiceContext,
    version: str,
    options: FollowOptions,
    *,
    stop: threading.Event | None = None,
    on_step: Callable[[FollowStep], None] | None = None,
) -> FollowReport:
    """Train `version` on the events stream until `stop` is set, `max_steps` is reached or
    (`once`) the stream holds nothing new; checkpoint and return what was done. Errors as
    `open_follow`; redis errors past the consumer's retries propagate."""
    follower = open_follow(ctx, version, options, on_step)
    follower.follow(stop, once=options.once)
    last = sorted(follower.checkpoint_dir.glob("step_*.pt"))
    return FollowReport(
        version=version,
        steps=follower.trainer.step,
        events=follower.stats.events,
        entries=follower.stats.entries,
        position=follower.state.position,
        ne=follower.trainer.ne(),
        sync_seq=follower.tracker.seq if follower.tracker is not None else None,
        checkpoint=str(last[-1]) if last else None,
    )
