"""Served impressions as a stream: the logging tier and the feedback join, live.

Lookups and scoring append one record batch per request to the impressions stream
(`impression_batch`). Two consumers turn them into stored TAEs and expert training rows:

**`ImpressionLogConsumer`** (group "logging", impressions stream): for every ACTIVE FM version
(the manifest, re-read when its file changes) the TAE of each impression as of its request
time, from the users' online histories (`OnlineHistories`; the engine reads only events
strictly before the request time), written by `logging_tier.log_version`: offline to
`data/tae_<v>/<YYYY-MM-DD>/part-<job>-...parquet` and online in Feast's layout. The job id
comes from the batch's entry ids, so a re-delivered batch replaces its own files; files are
written to a temporary name and renamed (kill-safe); NaN/Inf TAEs are refused (BadEmbeddings:
nothing of that version stored for the batch, counted); items outside a version's vocabulary
and surfaces outside the dataset's are skipped and counted. Each logged impression is then
recorded as *open* for the join (`OpenImpressions`).

**`FeedbackJoinConsumer`** (group "join", events stream; the group is created at "$" when the
consumer first starts, so it sees the events appended from then on: start it before serving,
or impressions served earlier may miss feedback that arrived before it): the paper's dynamic
join. An event for (user, item) on the impression's surface with event time in
[request time, request time + window] closes the impression (the latest open one at or before
the event, when several are): one training row with the impression's keys, request time, the
event's labels and each version's TAE as of the request time (the bytes the logging consumer
recorded, never recomputed). Each event closes at most one impression and each impression is
closed once: the first feedback wins, later events of the pair are ordinary events.
Impressions whose window passes without feedback are emitted by a sweep in the same consumer
as rows with their surface's task labels 0 (tasks outside the surface's space NaN, as in the
event log), `has_feedback` False. "The window passes" is judged in event time: the sweep
closes an impression once the join has seen an event later than its request time + window
(the watermark; `lateness_s` more, for events that arrive out of event-time order), so a
lagging join never labels an impression before it has read its feedback. Feedback that
arrives after its impression was swept is not joined (it counts among `unmatched_events`). Rows go to `data/training_rows/<YYYY-MM-DD of the request>/part-<job>.parquet`.

Ordering across the two streams. Stream entry ids come from one Redis clock, so they order the
two streams' appends. A consumer gated on another group (`StreamGate`) handles an entry only
once that group has acknowledged every entry of its stream appended before it: the logging
consumer waits for the histories consumer (a TAE as of request time t needs the events
ingested before t in the online histories), the join waits for the logging consumer (feedback
is ingested after its impression was served and appended, so it is joined only once that
impression is open). A gated batch stays pending and is tried again (`Behind`).

Open impressions in Redis (single server; keys of one repo's Feast project p):

    foundex:p:join:imp:<user>:<item>   hash; field `i:<request µs>:<surface>` = the TAE of each
                                       version as of the request time (packed float32),
                                       field `c:<request µs>:<surface>` = who closed it (the
                                       feedback event's id, or a sweep's name). Expires
                                       `window + slack` seconds after its last impression.
    foundex:p:join:user:<user>         set while the user has impressions recorded (same expiry):
                                       the join looks up only events of such users
    foundex:p:join:due                 sorted set: member `<user>:<item>:<request µs>:<surface>`,
                                       score = request µs + window (when the sweep may close it)
    foundex:p:join:watermark           the latest event time the join has handled (µs)
    foundex:p:join:sweep               the sweep in progress (its name and members), if any

Why the TAE bytes and not a reference: the online store keeps only the latest TAE per
(user, item), so a second impression of the pair would overwrite the first's; reading the
parquet parts back costs a file open per joined row. The record holds exactly the TAE logged
as of the request, so a row can never carry a later one. The price is memory: 4·dim bytes per
version per impression for window + slack (64-d, two versions: ~0.5 KB an impression).

Idempotence of the join: rows are written (temp + rename) before their impressions are marked
closed, and a closed impression keeps its record until the key expires; a batch handled again
(re-delivered) treats the impressions its own events closed as its own, so it rebuilds the
same rows under the same file names. A sweep records its name and members before writing, and
a restarted consumer finishes that sweep first. The join runs as one consumer (its closes and
sweeps are not coordinated between processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from fm.timefeatures import timestamps_us
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec
from store_bridge.logging_tier import (
    BadEmbeddings,
    log_version,
    prepare_impressions,
    write_parquet_atomic,
)
from store_bridge.repo import FeatureRepo, FMVersion
from store_bridge.streams.consumer import StreamConsumer
from store_bridge.streams.histories import OnlineHistories
from store_bridge.streams.impression_buffer import IMPRESSION_ACTION
from store_bridge.streams.records import EVENT_ID, content_ids
from store_bridge.streams.stream import Entry, RedisStream

log = logging.getLogger("foundex.streams")

TRAINING_ROWS_DIR = "training_rows"
# One chunk per batch in log_version: a batch's file names then never depend on its size.
_ONE_CHUNK = 1 << 30


# --- the record ---------------------------------------------------------------------------------


def _job(entries: list[Entry]) -> str:
    """A batch's job id from its first and last entry ids (`1700000000000-3` -> `1700000000000.3`):
    a re-delivered batch (the consumer's own pending entries, read again with the same count)
    gets the same id, hence the same file names."""
    ids = sorted((e.entry_id for e in entries), key=lambda x: tuple(int(p) for p in x.split("-")))
    return f"e{ids[0].replace('-', '.')}_{ids[-1].replace('-', '.')}"


# --- ordering across streams ---------------------------------------------------------------------


class Behind(RuntimeError):
    """The group a consumer waits for has not yet handled what came before its batch."""


def _ms(entry_id: str | bytes) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0])


class StreamGate:
    """Whether `group` of `stream` has acknowledged every entry appended before a given time.

    Entry ids of streams on one Redis share its clock, so an entry of another stream can be
    placed among this one's by its id's milliseconds."""

    def __init__(self, stream: RedisStream, group: str) -> None:
        self.stream, self.group = stream, group

    def oldest_unacked_ms(self) -> int | None:
        """Append time (ms) of the oldest entry `group` has not acknowledged; None when it has
        acknowledged everything, or when the stream or the group does not exist (nobody
        consumes it: there is nothing to wait for)."""
        client, key = self.stream.client, self.stream.key
        try:
            infos = client.xinfo_groups(key)
        except redis.ResponseError:  # no such stream
            return None
        for info in infos:
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.group:
                continue
            # The group moves on meanwhile; every race below errs towards an older id
            # (a longer wait), never a newer one.
            if int(info["pending"]) > 0:
                oldest = client.xpending(key, self.group)["min"]
                if oldest is not None:
                    return _ms(oldest)
            last = info["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            nxt = client.xrange(key, min=f"({last}", max="+", count=1)
            return _ms(nxt[0][0]) if nxt else None
        return None

    def passed(self, ms: int) -> bool:
        """Whether every entry appended before `ms` (and at it: same-millisecond order is
        unknown) has been acknowledged by the group."""
        oldest = self.oldest_unacked_ms()
        return oldest is None or oldest > ms


class _GatedConsumer(StreamConsumer):
    """A StreamConsumer whose batches wait for another group (`gate`): `handle` calls
    `_wait_for_gate` first, which raises Behind after `gate_wait_s`; the batch then stays
    pending (never acknowledged) and is read again first on the next poll. (`drain` therefore
    returns only once the gate opens: drain the group waited for first.)"""

    def __init__(
        self, stream: RedisStream, *, gate: StreamGate | None = None, gate_wait_s: float = 1.0,
        **kw,
    ) -> None:  # fmt: skip
        super().__init__(stream, **kw)
        self.gate, self.gate_wait_s = gate, float(gate_wait_s)
        self.gated = 0  # polls that found the gate closed
        self._last_gate_warning = 0.0

    def _wait_for_gate(self, entries: list[Entry]) -> None:
        if self.gate is None:
            return
        newest = max(e.ms for e in entries)
        deadline = time.monotonic() + self.gate_wait_s
        while not self.gate.passed(newest):
            if time.monotonic() >= deadline:
                raise Behind(
                    f"{self.group}: waiting for group {self.gate.group!r} of stream "
                    f"{self.gate.stream.name!r} to handle what was appended before this batch"
                )
            time.sleep(0.01)

    def poll(self, *, block: bool = True) -> int:
        try:
            return super().poll(block=block)
        except Behind as e:
            self.gated += 1
            if time.monotonic() - self._last_gate_warning > 30:
                self._last_gate_warning = time.monotonic()
                log.warning("%s (is `foundex consume %s` running?)", e, self.gate.group)
            # The batch was not acknowledged: read the consumer's pending entries again first.
            self._recovered = False
            return 0


# --- open impressions ----------------------------------------------------------------------------


def _pack(taes: dict[str, np.ndarray]) -> bytes:
    """{version: float32 [dim]} -> bytes: per version, name length (u8), dim (u32), name,
    the floats (little-endian)."""
    out = bytearray()
    for name, vec in taes.items():
        raw = name.encode()
        v = np.ascontiguousarray(vec, dtype="<f4")
        out += struct.pack("<BI", len(raw), len(v)) + raw + v.tobytes()
    return bytes(out)


def _unpack(raw: bytes) -> dict[str, np.ndarray]:
    out, at = {}, 0
    while at < len(raw):
        n, dim = struct.unpack_from("<BI", raw, at)
        at += 5
        name = raw[at : at + n].decode()
        at += n
        out[name] = np.frombuffer(raw, dtype="<f4", count=dim, offset=at).astype(np.float32)
        at += 4 * dim
    return out


@dataclass
class OpenImpression:
    """One logged impression as the join sees it."""

    user_id: int
    item_id: int
    ts_us: int  # request time
    surface: str
    taes: dict[str, np.ndarray] | None  # version -> float32 [dim]; None: the record expired
    closed_by: str | None  # the closing event's id or sweep's name; None while open

    @property
    def member(self) -> str:
        return f"{self.user_id}:{self.item_id}:{self.ts_us}:{self.surface}"


# ARGV: watermark candidate. Keeps the maximum.
_ADVANCE = """
local old = tonumber(redis.call('GET', KEYS[1]) or '-9007199254740992')
local new = tonumber(ARGV[1])
if new > old then redis.call('SET', KEYS[1], ARGV[1]) return new end
return old
"""

# KEYS: the impression's hash. ARGV: claim field, closer, ttl ms. The first closer wins; a key
# that expired just before (HSETNX made it anew) gets an expiry again, and a live one keeps its
# own. (PEXPIRE ... NX would say this in one command, but only from Redis 7; the embedded
# server is 6.2.)
_CLOSE = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
"""


class OpenImpressions:
    """Logged impressions waiting for feedback, in Redis (see the module docstring)."""

    def __init__(
        self, client: redis.Redis, project: str, *, window_s: float, slack_s: float = 600.0
    ) -> None:
        """window_s: feedback joins an impression within this many seconds of its request
        time; slack_s: records outlive their window by this much (wall clock) before Redis
        expires them, room for a join that lags."""
        if window_s <= 0:
            raise ValueError(f"join window must be > 0 s, got {window_s}")
        if slack_s < 0:
            raise ValueError(f"join slack must be >= 0 s, got {slack_s}")
        self.client = client
        self.window_us = int(round(window_s * 1e6))
        self.ttl_ms = int(round((window_s + slack_s) * 1000))
        self.prefix = f"foundex:{project}:join:"
        self.due_key = self.prefix + "due"
        self.watermark_key = self.prefix + "watermark"
        self.sweep_key = self.prefix + "sweep"
        self._advance = client.register_script(_ADVANCE)
        self._close = client.register_script(_CLOSE)

    def key(self, user_id: int, item_id: int) -> str:
        return f"{self.prefix}imp:{int(user_id)}:{int(item_id)}"

    def user_key(self, user_id: int) -> str:
        return f"{self.prefix}user:{int(user_id)}"

    @staticmethod
    def _fields(ts_us: int, surface: str) -> tuple[str, str]:
        return f"i:{int(ts_us)}:{surface}", f"c:{int(ts_us)}:{surface}"

    def open(
        self, user_ids: np.ndarray, item_ids: np.ndarray, ts_us: np.ndarray, surfaces: np.ndarray,
        taes: dict[str, tuple[np.ndarray, np.ndarray]],
    ) -> int:  # fmt: skip
        """Record impressions as open -> how many were new. taes: version -> (bool [n] rows
        the version embedded, float32 [n, dim]). Idempotent: an impression recorded before
        (open or closed) keeps its record."""
        pipe = self.client.pipeline(transaction=False)
        n = len(user_ids)
        for r in range(n):
            u, i, t, s = int(user_ids[r]), int(item_ids[r]), int(ts_us[r]), str(surfaces[r])
            payload = _pack({v: m[r] for v, (ok, m) in taes.items() if ok[r]})
            key = self.key(u, i)
            imp_field, _ = self._fields(t, s)
            pipe.hsetnx(key, imp_field, payload)
            pipe.pexpire(key, self.ttl_ms)
            pipe.zadd(self.due_key, {f"{u}:{i}:{t}:{s}": t + self.window_us}, nx=True)
        for u in np.unique(np.asarray(user_ids, dtype=np.int64)).tolist():
            pipe.set(self.user_key(u), 1, px=self.ttl_ms)
        res = pipe.execute()
        return sum(int(x) for x in res[0 : 3 * n : 3])

    def users_with_records(self, user_ids: list[int]) -> set[int]:
        """The users among these with impressions recorded (open or closed, not expired)."""
        if not user_ids:
            return set()
        got = self.client.mget([self.user_key(u) for u in user_ids])
        return {u for u, v in zip(user_ids, got, strict=True) if v is not None}

    def of_pairs(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], list[OpenImpression]]:
        """Every recorded impression (open or closed) of each (user, item), by request time."""
        pipe = self.client.pipeline(transaction=False)
        for u, i in pairs:
            pipe.hgetall(self.key(u, i))
        out = {}
        for (u, i), fields in zip(pairs, pipe.execute(), strict=True):
            out[(u, i)] = _records(u, i, fields)
        return out

    def get(self, members: list[str]) -> list[OpenImpression]:
        """The records of due-set members (`taes` None where the record expired)."""
        parsed = []
        pipe = self.client.pipeline(transaction=False)
        for m in members:
            u, i, t, s = m.split(":", 3)
            parsed.append((int(u), int(i), int(t), s))
            imp_field, claim_field = self._fields(int(t), s)
            pipe.hmget(self.key(int(u), int(i)), [imp_field, claim_field])
        out = []
        for (u, i, t, s), (raw, closer) in zip(parsed, pipe.execute(), strict=True):
            closed = closer.decode() if isinstance(closer, bytes) else closer
            out.append(OpenImpression(u, i, t, s, None if raw is None else _unpack(raw), closed))
        return out

    def close(self, closes: Iterable[tuple[OpenImpression, str]]) -> None:
        """Mark impressions closed by `closer` (first closer wins) and take them off the due
        set. Their records stay until the key expires (a batch handled again rebuilds its
        rows from them)."""
        pipe = self.client.pipeline(transaction=False)
        for imp, closer in closes:
            if imp.taes is not None:  # an expired record is only taken off the due set
                key = self.key(imp.user_id, imp.item_id)
                _, claim_field = self._fields(imp.ts_us, imp.surface)
                self._close(keys=[key], args=[claim_field, closer, self.ttl_ms], client=pipe)
            pipe.zrem(self.due_key, imp.member)
        pipe.execute()

    def due(self, watermark_us: int, limit: int) -> list[str]:
        """Members whose window ended before `watermark_us`, oldest first (at most `limit`)."""
        got = self.client.zrangebyscore(self.due_key, "-inf", f"({watermark_us}", 0, limit)
        return [m.decode() if isinstance(m, bytes) else m for m in got]

    def watermark(self) -> int | None:
        """The latest event time the join has handled (µs), None before any."""
        raw = self.client.get(self.watermark_key)
        return None if raw is None else int(raw)

    def advance(self, event_us: int) -> int:
        """Raise the watermark to `event_us` if later -> the watermark."""
        return int(self._advance(keys=[self.watermark_key], args=[int(event_us)]))

    def pending_sweep(self) -> tuple[str, list[str]] | None:
        raw = self.client.get(self.sweep_key)
        if raw is None:
            return None
        d = json.loads(raw)
        return d["name"], d["members"]

    def begin_sweep(self, name: str, members: list[str]) -> None:
        self.client.set(self.sweep_key, json.dumps({"name": name, "members": members}))

    def end_sweep(self) -> None:
        self.client.delete(self.sweep_key)

    def open_count(self) -> int:
        """Impressions waiting for feedback or for their window to pass."""
        return int(self.client.zcard(self.due_key))


def _records(user: int, item: int, fields: dict) -> list[OpenImpression]:
    payloads, closers = {}, {}
    for k, v in fields.items():
        k = k.decode() if isinstance(k, bytes) else k
        kind, _, rest = k.partition(":")
        if kind == "i":
            payloads[rest] = v
        elif kind == "c":
            closers[rest] = v.decode() if isinstance(v, bytes) else v
    out = []
    for rest, raw in payloads.items():
        t, _, s = rest.partition(":")
        out.append(OpenImpression(user, item, int(t), s, _unpack(raw), closers.get(rest)))
    return sorted(out, key=lambda r: r.ts_us)


# --- the logging consumer --------------------------------------------------------------------------


@dataclass
class LogStats:
    impressions: int = 0  # rows handled (after dedup)
    logged: Counter = field(default_factory=Counter)  # version -> rows stored
    unknown_items: int = 0  # (row, version) pairs skipped: item outside that FM's vocabulary
    unknown_surface: int = 0  # rows skipped: surface outside the dataset's
    refused: int = 0  # (row, version) pairs refused: the FM produced NaN/Inf
    versions_unavailable: int = 0  # (batch, version) pairs skipped: the model does not load
    bad_entries: int = 0  # entries skipped: not impression rows


class _Recording:
    """A TAEFunction that keeps what it returned (log_version stores it; the join needs it)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def known_items(self, item_ids: np.ndarray) -> np.ndarray:
        return self.engine.known_items(np.asarray(item_ids))

    def __call__(self, users, items, ts_us, surfaces) -> np.ndarray:
        m = self.engine.compute(
            np.asarray(users), np.asarray(items), np.asarray(ts_us), np.asarray(surfaces)
        )
        self.calls.append((np.asarray(users), np.asarray(items), np.asarray(ts_us), m))
        return m


@dataclass
class _LoadedEngine:
    engine: object  # fm.TAEEngine (torch loads only with the first model)
    lock: threading.Lock
    sync: object  # store_bridge.fm_tier.EngineSync: the weight-sync seq the engine stands at


class ImpressionLogConsumer(_GatedConsumer):
    """The `logging` role (see the module docstring)."""

    group = "logging"

    def __init__(
        self, stream: RedisStream, repo: FeatureRepo, store, histories: OnlineHistories, *,
        opens: OpenImpressions | None = None, **kw,
    ) -> None:  # fmt: skip
        """store: the online EmbeddingStore; histories: the online histories the TAEs read;
        opens: where logged impressions are recorded for the join (None: no join)."""
        super().__init__(stream, **kw)
        self.repo, self.store, self.histories, self.opens = repo, store, histories, opens
        self.log_stats = LogStats()
        self._engines: dict[tuple[str, str], _LoadedEngine | None] = {}
        self._manifest_stamp: tuple | None = None
        self._active: list[FMVersion] = []

    # -- inputs --

    def active_versions(self) -> list[FMVersion]:
        """The manifest's active versions, in publishing order; re-read when its file changes."""
        from store_bridge.versions import VersionRegistry

        path = self.repo.manifest_path
        try:
            st = path.stat()
            stamp: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._manifest_stamp:
            manifest = self.repo.load_manifest()
            self._active = VersionRegistry(manifest=manifest).active()
            self._manifest_stamp = stamp
        return self._active

    def _impressions(self, entries: list[Entry]) -> pd.DataFrame:
        """The batch's impression rows, validated: one per (user, item, time), time-sorted.
        Rows on surfaces the dataset lacks are skipped; an entry that is not impression rows
        is skipped whole (logged, counted: it would fail every delivery)."""
        surfaces = self.histories.surfaces
        frames = []
        for e in entries:
            df = e.table.to_pandas()
            try:
                known = df["surface"].isin(surfaces).to_numpy()
                if not known.all():
                    bad = sorted({str(s) for s in df["surface"][~known]})
                    self.log_stats.unknown_surface += int((~known).sum())
                    log.warning("logging: skipped %d impressions on surfaces %s (known: %s)",
                                int((~known).sum()), bad, surfaces)
                    df = df[known]
                frames.append(prepare_impressions(df, surfaces))
            except (KeyError, ValueError) as err:
                self.log_stats.bad_entries += 1
                log.error("logging: stream entry %s is not impression rows, skipped: %s",
                          e.entry_id, err)
        if not frames:
            return pd.DataFrame()
        imp = pd.concat(frames, ignore_index=True)
        imp = imp.drop_duplicates(["user_id", "item_id", EVENT_TIMESTAMP])
        return imp.sort_values([EVENT_TIMESTAMP, "user_id", "item_id"], kind="stable").reset_index(
            drop=True
        )

    def _engine(self, version: FMVersion, histories) -> _LoadedEngine | None:
        from store_bridge.fm_tier import engine_sync, load_engine

        key = (version.version, version.digest)
        if key not in self._engines:
            try:
                engine = load_engine(self.repo, version, histories)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                log.warning("logging: FM %s cannot be loaded, its TAEs are not logged: %s",
                            version.version, e)
                engine = None
            loaded = None
            if engine is not None:
                sync = engine_sync(self.repo, self.histories.client, self.histories.project,
                                   version.version)
                loaded = _LoadedEngine(engine, threading.Lock(), sync)
                sync.check(engine, loaded.lock, version.version)  # the latest synced weights
            self._engines[key] = loaded
        return self._engines[key]

    def sync_engines(self) -> dict[str, int]:
        """Catch each loaded engine up with its version's published weight sync (between
        batches: a batch is computed with one set of weights) -> version -> seq."""
        out = {}
        for (name, _), loaded in self._engines.items():
            if loaded is not None:
                loaded.sync.check(loaded.engine, loaded.lock, name)
                out[name] = loaded.sync.seq
        return out

    # -- the batch --

    def handle(self, entries: list[Entry]) -> None:
        self._wait_for_gate(entries)
        imp = self._impressions(entries)
        if imp.empty:
            return
        self.sync_engines()
        job = _job(entries)
        users = imp["user_id"].to_numpy(np.int64)
        histories, _ = self.histories.histories_for(users)
        taes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for version in self.active_versions():
            got = self._log_version(version, imp, histories, job)
            if got is not None:
                taes[version.version] = got
        if self.opens is not None:
            self.opens.open(
                users, imp["item_id"].to_numpy(np.int64), timestamps_us(imp[EVENT_TIMESTAMP]),
                imp["surface"].to_numpy(object), taes,
            )  # fmt: skip
        self.log_stats.impressions += len(imp)

    def _log_version(
        self, version: FMVersion, imp: pd.DataFrame, histories, job: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Store one version's TAEs of the batch -> (bool [n] rows embedded, float32 [n, dim]),
        None when nothing was stored (model unavailable, NaN refused)."""
        from store_bridge.online import StoreUnavailable

        loaded = self._engine(version, histories)
        if loaded is None:
            self.log_stats.versions_unavailable += 1
            return None
        fn = _Recording(loaded.engine)
        with loaded.lock:  # the engine reads the histories it holds: one batch at a time
            loaded.engine.set_histories(histories)
            try:
                rep = log_version(self.repo, self.store, version.version, fn, imp,
                                  chunk_rows=_ONE_CHUNK, progress=False, job=job, resume=False,
                                  sync_seq=loaded.sync.seq)
            except BadEmbeddings as e:
                self.log_stats.refused += len(imp)
                log.error("logging: %s (batch %s)", e, job)
                return None
            except StoreUnavailable as e:  # the loop's reconnect/backoff handles Redis errors
                if isinstance(e.__cause__, redis.RedisError):
                    raise e.__cause__ from e
                raise
        self.log_stats.unknown_items += rep.unknown_items
        self.log_stats.logged[version.version] += rep.rows
        items = imp["item_id"].to_numpy(np.int64)
        known = np.asarray(fn.known_items(items), dtype=bool)
        matrix = np.full((len(imp), version.dim), np.nan, dtype=np.float32)
        if fn.calls:
            got_items = np.concatenate([c[1] for c in fn.calls])
            if not np.array_equal(got_items, items[known]):  # log_version's row order changed
                raise RuntimeError("logging: TAE rows do not line up with the impressions")
            matrix[known] = np.concatenate([c[3] for c in fn.calls])
        return known, matrix


# --- the feedback join ---------------------------------------------------------------------------


@dataclass
class JoinStats:
    joined: int = 0  # rows closed by feedback
    swept: int = 0  # rows emitted without feedback after their window
    unmatched_events: int = 0  # events that closed no impression (most are not feedback)
    expired: int = 0  # due impressions whose record Redis expired before the sweep (lost)


class FeedbackJoinConsumer(_GatedConsumer):
    """The `join` role on the events stream (see the module docstring)."""

    group = "join"

    def __init__(
        self, stream: RedisStream, repo: FeatureRepo, opens: OpenImpressions, spec: DatasetSpec,
        *, sweep_limit: int = 5000, lateness_s: float = 0.0, **kw,
    ) -> None:  # fmt: skip
        """spec: the dataset's tasks (label columns) and each surface's task space;
        sweep_limit: impressions one sweep emits at most; lateness_s: how far out of
        event-time order feedback may arrive and still be joined (an impression is swept once
        the watermark passes its window's end by this much)."""
        if lateness_s < 0:
            raise ValueError(f"lateness must be >= 0 s, got {lateness_s}")
        kw.setdefault("group_start", "$")
        super().__init__(stream, **kw)
        self.repo, self.opens, self.spec = repo, opens, spec
        self.tasks = list(spec.all_tasks)
        self.sweep_limit = int(sweep_limit)
        self.lateness_us = int(round(lateness_s * 1e6))
        self.join_stats = JoinStats()

    def poll(self, *, block: bool = True) -> int:
        """Sweep due impressions, then one round of events -> impressions swept plus events
        handled."""
        return self.sweep() + super().poll(block=block)

    # -- feedback --

    def handle(self, entries: list[Entry]) -> None:
        self._wait_for_gate(entries)
        events = _feedback_frame(entries, self.tasks)
        if events.empty:
            return
        # Only events of users with recorded impressions can be feedback: one MGET for the
        # batch's users, then the records of those events' (user, item) pairs.
        users = self.opens.users_with_records(np.unique(events["user_id"]).tolist())
        cand = events[events["user_id"].isin(users)]
        pairs = sorted(set(zip(cand["user_id"].tolist(), cand["item_id"].tolist(), strict=True)))
        records = self.opens.of_pairs(pairs) if pairs else {}
        has = [bool(records[p]) for p in zip(cand["user_id"], cand["item_id"], strict=True)]
        cand = cand[np.array(has, dtype=bool)]
        taken: set[str] = set()
        rows, closes = [], []
        for ev in cand.to_dict("records"):  # event-time order: earlier feedback first
            imp = self._match(records[(ev["user_id"], ev["item_id"])], ev, taken)
            if imp is None:
                continue
            taken.add(imp.member)
            rows.append(_row(imp, {t: ev[t] for t in self.tasks}, int(ev["action"]), feedback=ev))
            closes.append((imp, str(ev[EVENT_ID])))
        self.join_stats.unmatched_events += len(events) - len(rows)
        if rows:
            _write_rows(self.repo, rows, self.tasks, _job(entries))
            self.opens.close(closes)  # after the rows are on disk: see the module docstring
            self.join_stats.joined += len(rows)
        self.opens.advance(int(events["ts_us"].max()))

    def _match(self, records: list[OpenImpression], ev: dict, taken: set[str]) -> OpenImpression | None:
        """The impression this event closes: one it closed already (a batch handled again),
        else the latest open one on its surface with request time <= event time <= request
        time + window; None when there is none."""
        best = None
        t, eid = ev["ts_us"], str(ev[EVENT_ID])
        for r in records:
            if r.surface != ev["surface"] or not (r.ts_us <= t <= r.ts_us + self.opens.window_us):
                continue
            if r.closed_by == eid:
                return r
            if r.closed_by is None and r.member not in taken and (best is None or r.ts_us > best.ts_us):
                best = r
        return best

    # -- the window --

    def sweep(self) -> int:
        """Emit the impressions whose window passed without feedback (labels 0) -> rows
        emitted. Finishes a sweep a killed consumer left first."""
        pending = self.opens.pending_sweep()
        if pending is None:
            wm = self.opens.watermark()
            if wm is None:
                return 0
            members = self.opens.due(wm - self.lateness_us, self.sweep_limit)
            if not members:
                return 0
            name = "sweep." + hashlib.sha256("\n".join(members).encode()).hexdigest()[:16]
            self.opens.begin_sweep(name, members)
        else:
            name, members = pending
        records = self.opens.get(members)
        rows, closes = [], []
        for r in records:
            if r.taes is None:
                self.join_stats.expired += 1
                log.warning("join: impression %s expired in Redis before its window was swept "
                            "(raise the join slack, or keep the join consumer running)", r.member)
                closes.append((r, name))
                continue
            if r.closed_by not in (None, name):
                # Closed by feedback; a re-delivered logging batch put it on the due set again.
                closes.append((r, name))  # first closer wins: only taken off the due set
                continue
            labels = {t: (0.0 if t in self.spec.surface_tasks.get(r.surface, []) else np.nan)
                      for t in self.tasks}
            rows.append(_row(r, labels, 0, feedback=None))
            closes.append((r, name))
        if rows:
            _write_rows(self.repo, rows, self.tasks, name)
        self.opens.close(closes)
        self.opens.end_sweep()
        self.join_stats.swept += len(rows)
        return len(rows)


def _feedback_frame(entries: list[Entry], tasks: list[str]) -> pd.DataFrame:
    """The batch's events as one frame in event-time order: keys, ts_us, event_id, action, the
    task labels (NaN where absent) and the entry's ingest time."""
    frames = []
    for e in entries:
        df = e.table.to_pandas()
        if df.empty:
            continue
        df["ingest_us"] = e.ingest_us
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    df["ts_us"] = timestamps_us(df[EVENT_TIMESTAMP])
    df["user_id"] = df["user_id"].astype(np.int64)
    df["item_id"] = df["item_id"].astype(np.int64)
    df["surface"] = df["surface"].astype(str)
    if "action" not in df:
        df["action"] = 0
    for t in tasks:
        df[t] = df[t].astype(np.float32) if t in df else np.float32(np.nan)
    cols = ["user_id", "item_id", "ts_us", "surface", EVENT_ID, "action", "ingest_us", *tasks]
    return df[cols].sort_values("ts_us", kind="stable").reset_index(drop=True)


def _row(imp: OpenImpression, labels: dict, action: int, *, feedback: dict | None) -> dict:
    return {
        "user_id": imp.user_id,
        "item_id": imp.item_id,
        "ts_us": imp.ts_us,
        "surface": imp.surface,
        "has_feedback": feedback is not None,
        "feedback_event_id": None if feedback is None else str(feedback[EVENT_ID]),
        "feedback_us": None if feedback is None else int(feedback["ts_us"]),
        "feedback_ingest_us": None if feedback is None else int(feedback["ingest_us"]),
        "action": action,
        "labels": labels,
        "taes": imp.taes or {},
    }


def _write_rows(repo: FeatureRepo, rows: list[dict], tasks: list[str], job: str) -> list[Path]:
    """Rows -> one parquet file per request day, `part-<job>.parquet`, each written to a
    temporary name and renamed (a job written again replaces its own files)."""
    root = repo.data / TRAINING_ROWS_DIR
    written_us = time.time_ns() // 1000
    versions = sorted({v for r in rows for v in r["taes"]}, key=lambda v: (len(v), v))
    ts = np.array([r["ts_us"] for r in rows], dtype=np.int64)
    days = ts.astype("datetime64[us]").astype("datetime64[D]").astype(str)
    paths = []
    for day in np.unique(days):
        sel = [r for r, d in zip(rows, days, strict=True) if d == day]
        path = root / str(day) / f"part-{job}.parquet"
        write_parquet_atomic(_rows_table(sel, tasks, versions, written_us), path)
        paths.append(path)
    return paths


def _rows_table(rows: list[dict], tasks: list[str], versions: list[str], written_us: int) -> pa.Table:
    ts = pa.timestamp("us", tz="UTC")
    ingest = np.array([r["feedback_ingest_us"] or 0 for r in rows], dtype=np.int64)
    has = np.array([r["has_feedback"] for r in rows], dtype=bool)
    cols = {
        "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
        "item_id": pa.array([r["item_id"] for r in rows], pa.int64()),
        EVENT_TIMESTAMP: pa.array([r["ts_us"] for r in rows], pa.int64()).cast(ts),
        "surface": pa.array([r["surface"] for r in rows], pa.string()),
        "impression_id": pa.array(
            content_ids(
                np.array([r["user_id"] for r in rows]), np.array([r["item_id"] for r in rows]),
                np.array([r["ts_us"] for r in rows]), np.array([r["surface"] for r in rows], object),
                np.full(len(rows), IMPRESSION_ACTION),
            ),
            pa.string(),
        ),  # fmt: skip
        "has_feedback": pa.array(has, pa.bool_()),
        "feedback_event_id": pa.array([r["feedback_event_id"] for r in rows], pa.string()),
        "feedback_timestamp": pa.array([r["feedback_us"] for r in rows], pa.int64()).cast(ts),
        "action": pa.array([r["action"] for r in rows], pa.int16()),
    }
    for t in tasks:
        cols[t] = pa.array([r["labels"][t] for r in rows], pa.float32())
    for v in versions:
        cols[f"tae_{v}"] = pa.array(
            [r["taes"].get(v) for r in rows], pa.list_(pa.float32())
        )  # null where the version had no TAE for the impression
    cols["feedback_ingest_us"] = pa.array(np.where(has, ingest, 0), pa.int64(), mask=~has)
    cols["written_us"] = pa.array(np.full(len(rows), written_us), pa.int64())
    # Data-to-trainer latency: event ingested -> its training row written (null when swept).
    cols["data_to_trainer_us"] = pa.array(written_us - ingest, pa.int64(), mask=~has)
    return pa.table(cols)


def read_training_rows(
    repo: FeatureRepo, *, start: str | None = None, end: str | None = None
) -> pd.DataFrame:
    """The join's expert training rows as one DataFrame (empty when there are none).

    start, end: inclusive request days `YYYY-MM-DD` to read (default: all). Columns:
    user_id, item_id, event_timestamp (the request time, UTC), surface, impression_id,
    has_feedback, feedback_event_id, feedback_timestamp, action, one float32 column per task
    (the feedback's labels; 0 on the surface's tasks when swept), tae_<version> (float32
    arrays; None where that version had none), feedback_ingest_us, written_us,
    data_to_trainer_us (µs; null when swept)."""
    root = repo.data / TRAINING_ROWS_DIR
    if not root.is_dir():
        return pd.DataFrame()
    files = [
        p for p in sorted(root.glob("*/part-*.parquet"))
        if (start is None or p.parent.name >= start) and (end is None or p.parent.name <= end)
    ]  # fmt: skip
    if not files:
        return pd.DataFrame()
    table = pa.concat_tables([pq.read_table(p) for p in files], promote_options="default")
    return table.to_pandas()
