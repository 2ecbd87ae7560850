"""FM weight sync on disk and in Redis: the trainer publishes updates, serving and logging read.

What an update is (a delta of the most-updated components, or a full snapshot, each with a
sync sequence number and digests) is `fm.sync`'s business; this module moves them.

    <repo>/data/fm_sync/<version>/snapshot-<seq>.pt   a full state      (fm.sync wire format)
    <repo>/data/fm_sync/<version>/delta-<seq>.pt      a delta
    Redis stream "fm_sync:<version>" (store_bridge.streams.stream.RedisStream, no consumer
    groups): one entry per update, a one-row Arrow table with version, seq, kind, path
    (relative to data/), base_digest ("" for a snapshot), digest, step, time_us, nbytes,
    file_sha256 (of the file's bytes)

Why a stream and not one key: a reader needs the ordered list of updates since a snapshot, not
only the latest one; the stream keeps that order, XREVRANGE answers "latest seq" in one round
trip, and a retried publish is deduplicated by the stream's event id. Nobody acknowledges
entries: every serving and logging process reads the (short) stream whole. Retention keeps the
last `keep_snapshots` snapshots and everything after the oldest of them, in Redis and on disk.

Publishing writes the file first (tmp + fsync + rename), then appends the announcement, so an
announcement never names a half-written file. A crash between the two leaves a file nobody
announced, which the next publish of that seq overwrites.

Reading (`SyncReader.poll`): the announced deltas after the reader's seq, each checked to apply
to the state before it (digests). When that chain breaks (an announcement or a file is lost,
a file is damaged, or the reader's state is not the base of the next delta), the reader
recovers: the latest snapshot it can load and the deltas after it. Either way the updates
are read and checked (file checksum, digests) before they are returned, so the caller builds
the new state aside (`fm.sync.apply_updates`, or `SyncReader.catch_up` which does both) and
swaps it in between requests: a request never sees a half-applied model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import redis

from fm.sync import (
    Delta,
    DeltaMismatch,
    Snapshot,
    SyncedState,
    SyncFormatError,
    Update,
    apply_updates,
    update_from_bytes,
)
from fm.timefeatures import iso_utc
from store_bridge.repo import VERSION_RE, FeatureRepo
from store_bridge.streams.records import EVENT_ID, decode_batch
from store_bridge.streams.stream import RedisStream

log = logging.getLogger(__name__)

SYNC_DIR = "fm_sync"
_FILE_RE = re.compile(r"^(snapshot|delta)-(\d+)\.pt$")


class SyncConflict(ValueError):
    """An update whose seq is not after the latest one published for the version (two trainers
    on one version, or a trainer that restarted without `SyncReader.load_state`)."""


@dataclass(frozen=True)
class Announcement:
    """One published update, as the stream tells it."""

    version: str
    seq: int
    kind: str  # "delta" | "snapshot"
    path: str  # relative to the repo's data dir
    base_digest: str  # "" for a snapshot
    digest: str
    step: int  # the trainer's step
    time_us: int  # when it was published, µs since the epoch (UTC)
    nbytes: int  # file size
    file_sha256: str  # of the file's bytes: a damaged delta is caught before it is applied
    entry_id: str = ""  # the stream entry


def sync_dir(repo: FeatureRepo, version: str) -> Path:
    """Where one FM version's deltas and snapshots live. ValueError for a bad version name."""
    if not VERSION_RE.match(version):
        raise ValueError(f"FM version names look like v1, v2, ...; got {version!r}")
    return repo.data / SYNC_DIR / version


def update_file(kind: str, seq: int) -> str:
    return f"{kind}-{seq}.pt"


class _SyncChannel:
    """What publisher and reader share: the version's folder and announcement stream."""

    def __init__(
        self,
        repo: FeatureRepo,
        client: redis.Redis,
        version: str,
        *,
        project: str | None = None,
        max_entries: int = 10_000,
    ) -> None:
        """project: the key namespace (default: the repo's Feast project). max_entries bounds
        the stream; retention keeps it far below that unless snapshots stop."""
        self.repo, self.version = repo, version
        self.dir = sync_dir(repo, version)
        self.stream = RedisStream(
            client,
            project or repo.project,
            f"fm_sync:{version}",
            max_entries=max_entries,
            dedup_s=3600,
        )

    def latest(self) -> Announcement | None:
        """The last update published for the version, None before the first."""
        rows = self.stream.client.xrevrange(self.stream.key, count=1)
        if not rows:
            return None
        last = self._parse(*rows[0])
        if last is None:  # an unreadable last entry: the last readable one
            anns = self.announcements()
            last = anns[-1] if anns else None
        return last

    def announcements(self) -> list[Announcement]:
        """Every retained announcement, in seq order (for a seq announced twice, the last)."""
        rows = self.stream.client.xrange(self.stream.key)
        by_seq = {a.seq: a for a in (self._parse(eid, f) for eid, f in rows) if a is not None}
        return [by_seq[s] for s in sorted(by_seq)]

    def _parse(self, entry_id: bytes | str, fields: dict) -> Announcement | None:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        payload = fields.get(b"b", fields.get("b"))
        try:
            row = decode_batch(payload).to_pylist()[0]
            a = Announcement(
                version=str(row["version"]),
                seq=int(row["seq"]),
                kind=str(row["kind"]),
                path=str(row["path"]),
                base_digest=str(row["base_digest"]),
                digest=str(row["digest"]),
                step=int(row["step"]),
                time_us=int(row["time_us"]),
                nbytes=int(row["nbytes"]),
                file_sha256=str(row["file_sha256"]),
                entry_id=eid,
            )
        except (pa.ArrowInvalid, KeyError, IndexError, TypeError, ValueError):
            log.warning("fm_sync %s: unreadable announcement %s skipped", self.version, eid)
            return None
        if a.version != self.version or a.path != self._relpath(a.kind, a.seq):
            log.warning(
                "fm_sync %s: announcement %s names %s %s, skipped",
                self.version,
                eid,
                a.version,
                a.path,
            )
            return None
        return a

    def _relpath(self, kind: str, seq: int) -> str:
        return f"{SYNC_DIR}/{self.version}/{update_file(kind, seq)}"


class SyncPublisher(_SyncChannel):
    """The trainer's side: write each update's file, then announce it."""

    def __init__(
        self,
        repo: FeatureRepo,
        client: redis.Redis,
        version: str,
        *,
        keep_snapshots: int = 2,
        **kw,
    ) -> None:
        """keep_snapshots: snapshots retained (>= 1), with every update after the oldest."""
        super().__init__(repo, client, version, **kw)
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
        self.keep_snapshots = keep_snapshots

    def publish(self, update: Update) -> Announcement:
        """Write the update's file (atomically) and announce it -> its announcement.

        Publishing the update last published again is a no-op (a retry after a failure).
        Raises SyncConflict for a seq not after the latest published one, redis errors when
        Redis is down (nothing was announced: publish the same update again), StreamFull
        when the stream is full (snapshots stopped, so retention could not trim it)."""
        if not isinstance(update, Delta | Snapshot):
            raise TypeError(f"publish takes a Delta or a Snapshot, got {type(update).__name__}")
        last = self.latest()
        if last is not None and update.seq <= last.seq:
            if (last.seq, last.kind, last.digest) == (update.seq, update.kind, update.digest):
                return last
            raise SyncConflict(
                f"FM {self.version}: update {update.seq} is not after the latest published "
                f"seq {last.seq} (another trainer on this version, or a restart that did not "
                "resume from SyncReader.load_state)"
            )
        rel = self._relpath(update.kind, update.seq)
        data = update.to_bytes()
        _write_atomic(self.repo.data / rel, data)
        a = Announcement(
            version=self.version,
            seq=update.seq,
            kind=update.kind,
            path=rel,
            base_digest=update.base_digest if isinstance(update, Delta) else "",
            digest=update.digest,
            step=update.step,
            time_us=time.time_ns() // 1000,
            nbytes=len(data),
            file_sha256=hashlib.sha256(data).hexdigest(),
        )
        row = {k: [v] for k, v in asdict(a).items() if k != "entry_id"}
        row[EVENT_ID] = [f"{a.version}:{a.seq}:{a.kind}:{a.digest}"]
        entry = self.stream.append(pa.table(row)).entry_id
        self._record(a)
        if isinstance(update, Snapshot):
            self._retain()
        return replace(a, entry_id=entry or "")

    def _record(self, a: Announcement) -> None:
        """The manifest records the version's latest sync (seq, time), after the
        announcement: readers follow the stream, the manifest is the repo's record. Should
        writing it fail, the update stays published and the next publish records the latest."""
        from store_bridge.versions import VersionRegistry  # versions is heavier; publish only

        try:
            VersionRegistry(self.repo).record_sync(self.version, a.seq, iso_utc(a.time_us))
        except OSError as e:
            log.warning("fm_sync %s: update %d published but not recorded in the manifest: %s",
                        self.version, a.seq, e)

    def _retain(self) -> None:
        """Forget what comes before the oldest of the last `keep_snapshots` snapshots."""
        snaps = [a for a in self.announcements() if a.kind == "snapshot"]
        if len(snaps) <= self.keep_snapshots:
            return
        oldest = snaps[-self.keep_snapshots]
        self.stream.client.xtrim(self.stream.key, minid=oldest.entry_id, approximate=False)
        for path in self.dir.glob("*.pt"):
            m = _FILE_RE.match(path.name)
            if m and int(m.group(2)) < oldest.seq:
                path.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # announced files must survive a crash of the machine too
    os.replace(tmp, path)


@dataclass
class _Chain:
    """Updates read and checked from a starting point, and where they lead."""

    updates: list[Update]
    seq: int
    digest: str
    problem: str | None = None  # why it stopped before the latest update
    bad_start: bool = False  # it stopped at once: its start is not the base of what follows

    def after(self, seq: int, digest: str) -> list[Update] | None:
        """The updates after the point (seq, digest) if the chain passes through it."""
        for i, u in enumerate(self.updates):
            if (u.seq, u.digest) == (seq, digest):
                return self.updates[i + 1 :]
        return None


class SyncReader(_SyncChannel):
    """The serving and logging tiers' side: what to apply to catch up with the trainer.

    Not thread-safe: one poller per process, which then swaps the new state in between
    requests. `last_problem` says why the last poll had to recover (None when it did not),
    `recoveries` counts polls that did."""

    def __init__(self, repo: FeatureRepo, client: redis.Redis, version: str, **kw) -> None:
        super().__init__(repo, client, version, **kw)
        self.last_problem: str | None = None
        self.recoveries = 0
        # (latest entry, seq, digest) of a poll that found no way forward: the next poll with
        # the same ones answers [] at once instead of reading the snapshot again
        self._stuck: tuple[str, int, str] | None = None

    def poll(self, current_digest: str, current_seq: int) -> list[Update]:
        """Updates that take the state (current_seq, current_digest) to the latest published
        one, in order, read and checked: [] when it is current (or nothing is published).

        Normally the deltas after current_seq (a snapshot among them restarts the chain). If
        that chain is broken (see the module docstring), the latest loadable snapshot and the
        deltas after it, or as far as they go when they are broken too (never backwards from
        a state that is on the chain). Lost or damaged updates never raise: they are logged
        and `last_problem` says what happened. Redis errors propagate."""
        last = self.latest()
        if last is None or (last.seq, last.digest) == (current_seq, current_digest):
            self.last_problem = None
            return []
        if self._stuck == (last.entry_id, current_seq, current_digest):
            return []
        updates = self._plan(current_seq, current_digest)
        if not updates:
            self._stuck = (last.entry_id, current_seq, current_digest)
        return updates

    def _plan(self, current_seq: int, current_digest: str) -> list[Update]:
        anns = {a.seq: a for a in self.announcements()}
        if not anns:  # trimmed away between the two reads: next poll
            return []
        target = max(anns)
        loaded: dict[tuple[str, int], Update | str] = {}
        direct = None
        if current_seq <= target:
            direct = self._walk(anns, target, None, current_seq, current_digest, loaded)
            if direct.problem is None and direct.digest != anns[target].digest:
                direct.problem = f"state {current_seq} is not the published state {target}"
                direct.bad_start = True
            if direct.problem is None:
                self.last_problem = None
                return direct.updates
            problem = direct.problem
        else:
            problem = f"state {current_seq} is past the latest published seq {target}"
        self.recoveries += 1
        log.warning("fm_sync %s: %s; recovering from the last snapshot", self.version, problem)
        recovery = self._from_snapshots(anns, target, loaded)
        self.last_problem = problem
        if recovery is None:
            self.last_problem += "; no snapshot could be read to recover from"
        if recovery is None or recovery.problem is not None:
            if direct is not None and direct.updates:  # progress from a state on the chain
                return direct.updates
            trusted = direct is not None and not direct.bad_start
            if recovery is None or (trusted and recovery.seq <= current_seq):
                return []
        rest = recovery.after(current_seq, current_digest)
        return recovery.updates if rest is None else rest

    def catch_up(self, current: SyncedState) -> SyncedState:
        """`poll` and apply: the latest published state reachable from `current` (`current`
        itself when nothing is new; it is never modified). Should an update still fail to
        apply (DeltaMismatch: `current.digest` was not its weights' digest), the state is
        rebuilt from the last snapshot instead. The caller swaps the result in between
        requests."""
        updates = self.poll(current.digest, current.seq)
        if not updates:
            return current
        try:
            return apply_updates(current, updates)
        except DeltaMismatch as e:
            self.last_problem = str(e)
            log.warning("fm_sync %s: %s; rebuilding from the last snapshot", self.version, e)
            try:
                rebuilt = self.load_state()
            except SyncFormatError as no_snapshot:
                self.last_problem = f"{e}; {no_snapshot}"
                return current
            return current if rebuilt is None else rebuilt

    def load_state(self) -> SyncedState | None:
        """The latest published state rebuilt from its snapshot and the deltas after it (a
        cold-starting server, or a trainer resuming its SyncTracker); None when nothing is
        published. When the deltas after the last snapshot are broken, the state as far as
        they go. Raises SyncFormatError when no snapshot can be read."""
        anns = {a.seq: a for a in self.announcements()}
        if not anns:
            return None
        chain = self._from_snapshots(anns, max(anns), {})
        if chain is None:
            raise SyncFormatError(f"FM {self.version}: no snapshot in {self.dir} can be read")
        first = chain.updates[0]
        assert isinstance(first, Snapshot)  # a chain from a snapshot starts with it
        start = SyncedState(dict(first.state), first.seq, first.digest, first.step)
        return apply_updates(start, chain.updates[1:])

    def _from_snapshots(
        self, anns: dict[int, Announcement], target: int, loaded: dict
    ) -> _Chain | None:
        """From the newest snapshot that can be read, the chain up to `target` (the first
        complete one, newest first; else the one that gets furthest). None: no snapshot."""
        best = None
        for snap in sorted(
            (a for a in anns.values() if a.kind == "snapshot"), key=lambda a: -a.seq
        ):
            chain = self._walk(anns, target, snap, snap.seq, snap.digest, loaded)
            if not chain.updates:  # the snapshot itself could not be read
                continue
            if chain.problem is None:
                return chain
            if best is None or chain.seq > best.seq:
                best = chain
        return best

    def _walk(
        self,
        anns: dict[int, Announcement],
        target: int,
        snapshot: Announcement | None,
        seq: int,
        digest: str,
        loaded: dict[tuple[str, int], Update | str],
    ) -> _Chain:
        """Follow the announcements from (seq, digest) (or from `snapshot`, loaded first) up
        to `target`, reading each file; stop at the first gap, digest mismatch or bad file."""
        chain = _Chain([], seq, digest)
        if snapshot is not None:
            got = self._load(snapshot, loaded)
            if isinstance(got, str):
                chain.problem = got
                return chain
            chain.updates.append(got)
        while chain.seq < target:
            a = anns.get(chain.seq + 1)
            if a is None:
                chain.problem = f"update {chain.seq + 1} is not announced (lost)"
                break
            if a.kind == "delta" and a.base_digest != chain.digest:
                chain.bad_start = not chain.updates
                chain.problem = (
                    f"delta {a.seq} applies to state {a.base_digest[:16]}, the state before it "
                    f"is {chain.digest[:16]}"
                )
                break
            got = self._load(a, loaded)
            if isinstance(got, str):
                chain.problem = got
                break
            chain.updates = [got] if a.kind == "snapshot" else [*chain.updates, got]
            chain.seq, chain.digest = a.seq, a.digest
        return chain

    def _load(self, a: Announcement, loaded: dict[tuple[str, int], Update | str]) -> Update | str:
        """The announced update read from its file and checked against its announcement, or
        a one-line reason why not."""
        key = (a.kind, a.seq)
        if key not in loaded:
            loaded[key] = self._read(a)
        return loaded[key]

    def _read(self, a: Announcement) -> Update | str:
        path = self.repo.data / a.path
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != a.file_sha256:
                return f"{a.kind} {a.seq}: {path} is not the file that was announced (damaged)"
            u = update_from_bytes(data, source=str(path))
        except FileNotFoundError:
            return f"{a.kind} {a.seq} is announced but its file {path} is missing"
        except (OSError, SyncFormatError) as e:
            return f"{a.kind} {a.seq} is unreadable: {e}"
        base = u.base_digest if isinstance(u, Delta) else ""
        if (u.kind, u.seq, u.digest, base) != (a.kind, a.seq, a.digest, a.base_digest):
            return f"{path} does not hold the announced {a.kind} {a.seq}"
        return u
