"""The FM follower: continuous training of one published FM version on the live event stream.

One consumer group per version, `trainer:<version>`, on the events stream, created at "0"
the first time: it sees every entry the stream still holds. Rows whose event time is before
the end of the version's training window are dropped (the version learned from them); the
entries that held them still count as consumed.

Steps. Entries are taken in stream order; a step is the shortest run of consecutive entries
holding at least `min_requests` requests (rows grouped as `fm.batching.Requests` groups them;
a request whose rows straddle two entries counts in both, and its candidates train in two
steps: a candidate's output does not depend on the others'). Step boundaries thus depend on
the sequence of entries alone, so a run resumed from a checkpoint forms the same steps as one
that never stopped. Only when the stream is idle (a read finds nothing new), or at the end of
`--once`, is a shorter tail trained as a step of its own.

Histories. A request's history is its user's events strictly before the request time, read
from the online histories in Redis (`OnlineHistories.histories_for`): the very history the
serving tier computes TAEs from, and one that reaches before the follower started. The
follower first adds the step's own events to them (idempotent: the `histories` role adds the
same rows), so a lookup never depends on that role being ahead of the trainer. Events that
arrive out of time order may or may not be in a history depending on when they arrive; a
user whose history outgrew the cap since a request keeps only the newest `cap` events.

Exactly once. The checkpoint written every `checkpoint_every` steps (and on exit) records
the position (the id of the last entry trained), the entry ids of each step, and the sync
tracker's seq and digest; entries are acknowledged only after the checkpoint that covers
them is written. A restart resumes from the last checkpoint and reads its group's pending
entries again: those up to the position are skipped (and acknowledged: the checkpoint covers
them), those after it are trained. One follower per version: the group has one consumer,
named after it (SyncPublisher refuses a second trainer's updates too).

Weight sync. With `sync_every` > 0 the follower publishes a `fm.sync` update through
`SyncPublisher` every `sync_every` steps (a snapshot every `snapshot_every` syncs). The first
start publishes the published weights as snapshot 0; a restart rebuilds the tracker from what
was published (`SyncReader.load_state`), which may be ahead of the checkpoint (updates of
steps the killed run did after it): the deltas after the restart are measured against it.

Retention: the group holds every entry it has not acknowledged, so a stopped follower keeps
the stream from trimming; remove the group (`XGROUP DESTROY <stream> trainer:<v>`) when a
version is no longer followed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from store_bridge.repo import FeatureRepo, FMVersion
from store_bridge.streams.consumer import StreamConsumer
from store_bridge.streams.histories import OnlineHistories
from store_bridge.streams.stream import Entry, RedisStream

if TYPE_CHECKING:
    from fm.follow import StepMetrics, StreamingTrainer
    from fm.sync import SyncTracker
    from store_bridge.fm_sync import SyncPublisher

log = logging.getLogger("foundex.streams")

FOLLOW_DIR = "fm_follow"
KEEP_CHECKPOINTS = 3
STEP_LOG = 10_000  # steps whose entry ids a checkpoint keeps (the newest)


def trainer_group(version: str) -> str:
    """The consumer group of `version`'s follower on the events stream."""
    return f"trainer:{version}"


def follow_dir(repo: FeatureRepo, version: str) -> Path:
    """Where `version`'s follower writes its checkpoints."""
    return repo.data / FOLLOW_DIR / version


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id "ms-seq" as a tuple that orders like the stream."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class FollowStep:
    """One step of the follower, for progress reports."""

    metrics: StepMetrics
    entries: int  # stream entries the step consumed
    position: str  # the last of them
    sync_seq: int | None  # the tracker's seq after the step (None: sync off)
    checkpoint: Path | None  # written after this step


@dataclass
class _Pending:
    """An entry taken but not trained yet: its rows (time-filtered) and their request count."""

    entry: Entry
    rows: pa.Table | None
    requests: int


@dataclass
class FollowState:
    """What a follow checkpoint records beside the trainer's state."""

    version: str
    source_digest: str  # the published checkpoint the run started from
    position: str = ""  # the last entry trained ("" before the first)
    events: int = 0  # rows trained
    entries: int = 0  # entries consumed
    steps: list[list] = field(default_factory=list)  # [step, [entry ids]], the newest STEP_LOG
    sync: dict = field(default_factory=dict)  # seq, digest, step of the tracker

    def as_extra(self) -> dict:
        return {"follow": {k: getattr(self, k) for k in self.__dataclass_fields__}}


class FMFollower(StreamConsumer):
    """The follower of one FM version (see the module docstring)."""

    def __init__(
        self,
        stream: RedisStream,
        histories: OnlineHistories,
        trainer: StreamingTrainer,
        state: FollowState,
        checkpoint_dir: Path,
        *,
        not_before_us: int,
        checkpoint_every: int = 100,
        min_requests: int | None = None,
        max_steps: int | None = None,
        tracker: SyncTracker | None = None,
        publisher: SyncPublisher | None = None,
        on_step: Callable[[FollowStep], None] | None = None,
        **kw,
    ) -> None:
        """not_before_us: rows with an earlier event time are dropped (the version's training
        window end). min_requests: requests per step (default config.batch_requests).
        max_steps: stop once the trainer's step count (resumed steps included) reaches it."""
        self.group = trainer_group(state.version)
        super().__init__(stream, group_start="0", **kw)
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.histories, self.trainer, self.state = histories, trainer, state
        self.checkpoint_dir = Path(checkpoint_dir)
        self.not_before_us = int(not_before_us)
        self.checkpoint_every = int(checkpoint_every)
        self.min_requests = int(min_requests or trainer.config.batch_requests)
        self.max_steps = max_steps
        self.tracker, self.publisher = tracker, publisher
        self.on_step = on_step
        self._seen = state.position  # the last entry taken (trained or buffered)
        self._buffer: list[_Pending] = []
        self._uncovered: list[Entry] = []  # consumed since the last checkpoint: ack after the next
        self._unpublished = None  # an update whose publish failed: published again first
        self._last_ckpt_step = trainer.step

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.trainer.step >= self.max_steps

    # --- reading ------------------------------------------------------------------------------

    def poll(self, *, block: bool = True) -> int:
        """One round: after a (re)start every pending entry of this consumer, else new entries;
        take them, train every complete step; when nothing new came, train the tail ->
        events taken. Raises redis errors (`run` retries them)."""
        if self.done:
            return 0
        if not self._recovered:
            self.stream.ensure_groups((self.group,), start=self.group_start)
            entries = self._own_pending()
            self._recovered = True
        else:
            entries = self.stream.read(
                self.group, self.consumer, count=self.count,
                block_ms=self.block_ms if block else None, pending=False,
            )  # fmt: skip
        events = self._take(entries)
        if not entries:
            self._train_tail()
        if time.monotonic() - self._last_trim > self.trim_every_s:
            self._last_trim = time.monotonic()
            self.stream.trim()
        return events

    def _own_pending(self) -> list[Entry]:
        """All entries delivered to this consumer and not acknowledged, oldest first. (Read
        whole: they stay pending until a checkpoint covers them, so reading them "from 0" in
        pages would return the first page forever.)"""
        summary = self.stream.client.xpending(self.stream.key, self.group)
        n = int(summary["pending"]) if summary else 0
        if n == 0:
            return []
        return self.stream.read(self.group, self.consumer, count=n, block_ms=None, pending=True)

    def _take(self, entries: list[Entry]) -> int:
        covered, events = [], 0
        for e in entries:
            if self._seen and entry_key(e.entry_id) <= entry_key(self._seen):
                # delivered again (restart, reconnect): trained or buffered already
                if self.state.position and entry_key(e.entry_id) <= entry_key(self.state.position):
                    covered.append(e)  # the last checkpoint covers it: only its ack was lost
                continue
            self._seen = e.entry_id
            rows = self._rows(e)
            n_req = _count_requests(rows)
            self._buffer.append(_Pending(e, rows, n_req))
            events += e.n
            if sum(p.requests for p in self._buffer) >= self.min_requests:
                self._train(self._buffer)
                self._buffer = []
                if self.done:
                    break
        if covered:
            self.stream.ack(self.group, covered)
        return events

    def _rows(self, e: Entry) -> pa.Table | None:
        if e.table is None:
            log.warning("%s: entry %s has no readable batch; skipped", self.group, e.entry_id)
            self.stats.unreadable += 1
            return None
        t = e.table
        keep = _micros(t) >= self.not_before_us
        return t if keep.all() else t.filter(pa.array(keep))

    def _train_tail(self) -> None:
        if self._buffer and not self.done:
            self._train(self._buffer)
            self._buffer = []

    # --- training -----------------------------------------------------------------------------

    def _train(self, pending: list[_Pending]) -> None:
        tables = [p.rows for p in pending if p.rows is not None and p.rows.num_rows]
        metrics = None
        if tables:
            df = pa.concat_tables(tables, promote_options="default").to_pandas()
            self.histories.add(df)  # idempotent; the lookup below must see these events
            hist, _ = self.histories.histories_for(df["user_id"].to_numpy(np.int64))
            metrics = self.trainer.train_events(df, hist)
        entries = [p.entry for p in pending]
        ids = [e.entry_id for e in entries]
        s = self.state
        s.position = ids[-1]
        s.entries += len(entries)
        self._uncovered.extend(entries)
        self.stats.entries += len(entries)
        if metrics is None:  # every row was before the window end: consumed, nothing to learn
            return
        s.events += metrics.events
        self.stats.events += metrics.events
        s.steps = [*s.steps[-(STEP_LOG - 1):], [metrics.step, ids]]
        self._sync(metrics.step)
        ckpt = None
        if metrics.step - self._last_ckpt_step >= self.checkpoint_every or self.done:
            ckpt = self.checkpoint()
        if self.on_step is not None:
            seq = self.tracker.seq if self.tracker is not None else None
            self.on_step(FollowStep(metrics, len(entries), s.position, seq, ckpt))

    def _sync(self, step: int) -> None:
        if self.tracker is None or self.publisher is None:
            return
        if self._unpublished is not None:  # a failed publish first (publishing is idempotent)
            self.publisher.publish(self._unpublished)
            self._unpublished = None
        update = self.tracker.maybe_sync(self.trainer.model.state_dict(), step)
        if update is not None:
            self._unpublished = update
            self.publisher.publish(update)
            self._unpublished = None

    def checkpoint(self) -> Path | None:
        """Write a checkpoint covering everything consumed, then acknowledge those entries
        -> its path (None when nothing was consumed since the last one)."""
        if not self._uncovered and self.trainer.step == self._last_ckpt_step:
            return None
        if self.tracker is not None:
            sy = self.tracker.synced
            self.state.sync = {"seq": sy.seq, "digest": sy.digest, "step": sy.step}
        path = self.trainer.save(
            self.checkpoint_dir / f"step_{self.trainer.step:08d}.pt", self.state.as_extra()
        )
        self._last_ckpt_step = self.trainer.step
        self.stream.ack(self.group, self._uncovered)  # only now: the checkpoint covers them
        self._uncovered = []
        _prune(self.checkpoint_dir, KEEP_CHECKPOINTS)
        return path

    # --- running ------------------------------------------------------------------------------

    def follow(self, stop: threading.Event | None = None, *, once: bool = False) -> None:
        """Train until `stop` is set or `max_steps` is reached (`once`: until the stream holds
        nothing new, the tail trained too), then checkpoint. Entries taken but not trained
        (a partial step when stopped) stay pending: the next run trains them."""
        stop = stop or threading.Event()
        if once:
            self.drain()
        else:
            watcher = threading.Thread(target=self._stop_when_done, args=(stop,), daemon=True)
            watcher.start()
            self.run(stop)
        self.checkpoint()

    def _stop_when_done(self, stop: threading.Event) -> None:
        while not stop.wait(0.05):
            if self.done:
                stop.set()


def _count_requests(rows: pa.Table | None) -> int:
    """Requests in an entry's rows: distinct (time, request_id), as Requests groups them."""
    if rows is None or rows.num_rows == 0:
        return 0
    rid = rows.column("request_id").to_numpy()
    return len(set(zip(_micros(rows).tolist(), rid.tolist(), strict=True)))


def _micros(rows: pa.Table) -> np.ndarray:
    """int64 [n]: the rows' event times in µs since the epoch (UTC)."""
    ts = rows.column("event_timestamp").cast(pa.timestamp("us", tz="UTC"))
    return ts.cast(pa.int64()).to_numpy()


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` step_*.pt checkpoints."""
    ckpts = sorted(folder.glob("step_*.pt"))
    for p in ckpts[:-keep]:
        p.unlink(missing_ok=True)


def _window_end_us(entry: FMVersion) -> int:
    from fm.timefeatures import to_us

    return int(to_us(pd.Timestamp(entry.training_window[1])))


def open_follower(
    repo: FeatureRepo,
    entry: FMVersion,
    stream: RedisStream,
    histories: OnlineHistories,
    *,
    checkpoint_every: int = 100,
    sync_every: int = 50,
    snapshot_every: int = 10,
    sync_fraction: float = 0.3,
    max_steps: int | None = None,
    on_step: Callable[[FollowStep], None] | None = None,
    device: str = "cpu",
) -> FMFollower:
    """The follower of the published version `entry`: resumed from its last checkpoint under
    `follow_dir`, else started from the version's training checkpoint; with `sync_every` > 0
    its SyncTracker rebuilt from what was published for the version, else started from the
    published weights, published as snapshot 0.

    Raises fm.checkpoint.CheckpointError (a ValueError) for an unreadable checkpoint,
    ValueError for a follow checkpoint of another version or another published checkpoint,
    and for bad cadences; redis errors when Redis is down."""
    from fm.follow import StreamingTrainer
    from fm.train import latest_checkpoint

    if sync_every < 0 or snapshot_every < 1 or not 0 < sync_fraction <= 1:
        raise ValueError(f"need sync_every >= 0, snapshot_every >= 1, 0 < sync_fraction <= 1; "
                         f"got {sync_every}, {snapshot_every}, {sync_fraction}")  # fmt: skip
    folder = follow_dir(repo, entry.version)
    last = latest_checkpoint(folder) if folder.is_dir() else None
    if last is None:
        trainer = StreamingTrainer.start(repo.data / entry.checkpoint, device=device)
        state = FollowState(entry.version, entry.digest)
    else:
        trainer, extra = StreamingTrainer.resume(last, device=device)
        state = FollowState(**extra.get("follow", {}))
        if (state.version, state.source_digest) != (entry.version, entry.digest):
            raise ValueError(
                f"{last} follows {state.version} from checkpoint {state.source_digest[:12]}, "
                f"not {entry.version} ({entry.digest[:12]}): move {folder} away to start afresh"
            )
    tracker = publisher = None
    if sync_every > 0:
        tracker, publisher = _sync_channel(
            repo, stream, trainer, entry.version,
            every_steps=sync_every, snapshot_every=snapshot_every, fraction=sync_fraction,
        )  # fmt: skip
    return FMFollower(
        stream, histories, trainer, state, folder, not_before_us=_window_end_us(entry),
        checkpoint_every=checkpoint_every, max_steps=max_steps, tracker=tracker,
        publisher=publisher, on_step=on_step,
    )  # fmt: skip


def _sync_channel(
    repo: FeatureRepo, stream: RedisStream, trainer: StreamingTrainer, version: str, **kw
) -> tuple[SyncTracker, SyncPublisher]:
    """The tracker (from what serving can load now, else the trainer's weights published as
    snapshot 0) and the publisher."""
    from fm.sync import SyncTracker, embedding_tables
    from store_bridge.fm_sync import SyncPublisher, SyncReader

    publisher = SyncPublisher(repo, stream.client, version)
    loaded = SyncReader(repo, stream.client, version).load_state()
    if loaded is None:
        tracker = SyncTracker.for_model(trainer.model, step=trainer.step, **kw)
        publisher.publish(tracker.base_snapshot())
        return tracker, publisher
    row_wise = [k for k in embedding_tables(trainer.model) if k in loaded.state]
    # The published state may be ahead of the checkpoint (a killed run's updates); the
    # cadence counts from the checkpoint's step.
    tracker = SyncTracker(
        loaded.state, seq=loaded.seq, step=min(loaded.step, trainer.step), row_wise=row_wise, **kw
    )
    return tracker, publisher
