"""A bounded Redis Stream of record batches, with consumer groups and per-event dedup.

Keys (one repo = one Feast project; the hash tag keeps a stream's keys on one cluster slot):

    foundex:{<project>:<name>}:stream        the Stream; entry fields b (Arrow IPC record batch),
                                             n (events in it), t (ingest time, µs since epoch)
    foundex:{<project>:<name>}:produced      events appended so far (INCRBY on every append)
    foundex:{<project>:<name>}:acked:<group> events a consumer group has acknowledged
    foundex:{<project>:<name>}:seen:<id>     an event id seen within the dedup window

Delivery: at least once per consumer group (XREADGROUP + XACK; a consumer that dies leaves its
entries pending and gets them again when it restarts, or another takes them over with
XAUTOCLAIM). Consumers make that exactly-once in effect by being idempotent per entry.

Retention: an entry stays until every consumer group of the stream has acknowledged it
(`trim`), and the stream never holds more than `max_entries` entries. Appending to a full
stream raises `StreamFull` (the REST face answers 429): nothing is ever dropped to make room.

Dedup: an event id seen within `dedup_s` seconds is not appended again (a client's retry of a
batch that did reach Redis is answered with the ids it already has). Ids and the entry go in
one server-side script, so a crash can neither mark ids seen without their entry nor the
reverse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import redis

from store_bridge.streams.records import EVENT_ID, decode_batch, encode_batch

# KEYS: stream, produced. ARGV: max_entries, dedup_s, payload, n, ingest_us, seen_prefix, ids...
_APPEND = """
local dups = {}
local dedup = tonumber(ARGV[2]) > 0
if dedup then
  for i = 7, #ARGV do
    if redis.call('EXISTS', ARGV[6] .. ARGV[i]) == 1 then dups[#dups + 1] = i - 7 end
  end
end
if #dups > 0 then return {'dup', dups} end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {'full'} end
local id = redis.call('XADD', KEYS[1], '*', 'b', ARGV[3], 'n', ARGV[4], 't', ARGV[5])
if dedup then
  for i = 7, #ARGV do redis.call('SET', ARGV[6] .. ARGV[i], id, 'EX', ARGV[2]) end
end
redis.call('INCRBY', KEYS[2], ARGV[4])
return {'ok', id}
"""

# KEYS: stream, acked counter. ARGV: group, then (entry id, events) pairs.
_ACK = """
local total = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then total = total + tonumber(ARGV[i + 1]) end
end
if total > 0 then redis.call('INCRBY', KEYS[2], total) end
return total
"""


class StreamFull(RuntimeError):
    """The stream holds `max_entries` entries its consumer groups have not all acknowledged."""


@dataclass
class Appended:
    """What one `append` did: the events' ids, in input order, and which were new."""

    entry_id: str | None  # the stream entry holding the new events; None if all were duplicates
    event_ids: list[str]
    new: int  # events appended
    duplicates: int  # events already in the stream within the dedup window


@dataclass
class Entry:
    """One delivered stream entry: a record batch of `n` events."""

    entry_id: str
    table: pa.Table | None  # None: the entry was trimmed or unreadable before delivery
    n: int
    ingest_us: int

    @property
    def ms(self) -> int:
        """Milliseconds since the epoch at which Redis appended the entry (from its id)."""
        return int(self.entry_id.split("-")[0])


@dataclass
class GroupLag:
    group: str
    events: int  # appended but not acknowledged by this group
    pending_entries: int  # delivered to a consumer, not acknowledged yet
    oldest_unacked_s: float  # age of the oldest entry not acknowledged (0 when none)


def _id_tuple(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStream:
    """One named stream of record batches on a single Redis (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        project: str,
        name: str,
        *,
        max_entries: int = 100_000,
        dedup_s: int = 600,
        groups: tuple[str, ...] = (),
    ) -> None:
        """`groups`: the consumer groups that must see every event; created (at the start
        of the stream) by `ensure_groups`, so retention waits for them from the first event."""
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if dedup_s < 0:
            raise ValueError(f"dedup_s must be >= 0, got {dedup_s}")
        self.client = client
        self.name = name
        self.max_entries = int(max_entries)
        self.dedup_s = int(dedup_s)
        self.groups = tuple(groups)
        base = f"foundex:{{{project}:{name}}}"
        self.key = f"{base}:stream"
        self.produced_key = f"{base}:produced"
        self._acked_prefix = f"{base}:acked:"
        self._seen_prefix = f"{base}:seen:"
        self._append = client.register_script(_APPEND)
        self._ack = client.register_script(_ACK)

    # --- producing ---------------------------------------------------------------------------

    def ensure_groups(self, groups: tuple[str, ...] | None = None, *, start: str = "0") -> None:
        """Create the consumer groups (and the stream) if missing; existing ones are kept.
        `start`: "0" (see every entry the stream still holds: for the groups declared with the
        stream, created before its first event) or "$" (only entries appended from now on)."""
        for group in self.groups if groups is None else groups:
            try:
                self.client.xgroup_create(self.key, group, id=start, mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
                continue
            if start == "$":  # joins now: what was produced before is not its lag
                self.client.set(self._acked_prefix + group, self.produced(), nx=True)

    def append(self, table: pa.Table) -> Appended:
        """Append one record batch whose `event_id` column names each event.

        Events whose id was appended within the dedup window are left out (repeated ids
        inside `table` too: the first one wins). Raises StreamFull when the stream holds
        `max_entries` entries after trimming what every group has acknowledged, and
        ValueError when `table` has no `event_id` column."""
        if EVENT_ID not in table.column_names:
            raise ValueError(f"a stream batch needs an {EVENT_ID!r} column")
        ids = [str(x) for x in table.column(EVENT_ID).to_pylist()]
        first: dict[str, int] = {}
        for i, eid in enumerate(ids):
            first.setdefault(eid, i)
        rows = sorted(first.values())  # rows of `table` still to append
        trimmed = False
        while rows:
            batch = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            res = self._append(
                keys=[self.key, self.produced_key],
                args=[
                    self.max_entries, self.dedup_s, encode_batch(batch), batch.num_rows,
                    time.time_ns() // 1000, self._seen_prefix,
                    *((ids[r] for r in rows) if self.dedup_s else ()),  # ids only for dedup
                ],
            )  # fmt: skip
            status = _text(res[0])
            if status == "ok":
                return Appended(_text(res[1]), ids, len(rows), len(ids) - len(rows))
            if status == "dup":  # appended before: keep only the others
                seen = {int(j) for j in res[1]}
                rows = [r for j, r in enumerate(rows) if j not in seen]
                continue
            if not trimmed:  # full: first free what every group has acknowledged
                trimmed = True
                if self.trim():
                    continue
            raise StreamFull(
                f"stream {self.name!r} is full ({self.max_entries} entries not yet acknowledged "
                f"by every consumer group); retry later, or start/scale its consumers "
                f"(`foundex consume <role>`)"
            )
        return Appended(None, ids, 0, len(ids))

    # --- consuming ---------------------------------------------------------------------------

    def read(
        self, group: str, consumer: str, *, count: int, block_ms: int | None, pending: bool
    ) -> list[Entry]:
        """Entries for `consumer` of `group`: its own pending ones (`pending=True`, oldest
        first; those already trimmed come back with table None) or new ones. Waits up to
        `block_ms` for new entries (None: no wait)."""
        res = self.client.xreadgroup(
            group, consumer, {self.key: "0" if pending else ">"}, count=count,
            block=None if pending else block_ms,
        )  # fmt: skip
        return [self._entry(eid, fields) for _, rows in res or [] for eid, fields in rows]

    def claim_idle(self, group: str, consumer: str, *, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries another consumer of `group` left pending for `min_idle_ms` (it
        died or hangs): they are delivered to `consumer` now."""
        res = self.client.xautoclaim(self.key, group, consumer, min_idle_ms, "0-0", count=count)
        rows = res[1] if len(res) > 1 else []
        return [self._entry(eid, fields) for eid, fields in rows]

    def ack(self, group: str, entries: list[Entry]) -> int:
        """Acknowledge delivered entries -> events newly acknowledged (a repeated ack counts
        nothing, so the group's counter stays exact)."""
        if not entries:
            return 0
        args: list = [group]
        for e in entries:
            args += [e.entry_id, e.n]
        return int(self._ack(keys=[self.key, self._acked_prefix + group], args=args))

    @staticmethod
    def _entry(entry_id, fields) -> Entry:
        eid = _text(entry_id)
        if not fields:  # deleted from the stream while pending
            return Entry(eid, None, 0, 0)
        f = {_text(k): v for k, v in fields.items()}
        try:
            table = decode_batch(f["b"])
        except (KeyError, pa.ArrowInvalid):
            table = None
        return Entry(eid, table, int(f.get("n", 0)), int(f.get("t", 0)))

    # --- retention and lag -------------------------------------------------------------------

    def _group_infos(self) -> list[dict]:
        try:
            infos = self.client.xinfo_groups(self.key)
        except redis.ResponseError:  # no such stream yet
            return []
        return [{_text(k): v for k, v in info.items()} for info in infos]

    def trim(self) -> int:
        """Delete the entries every consumer group has acknowledged -> entries deleted. With
        no group at all nothing is deleted (nobody has read anything)."""
        infos = self._group_infos()
        if not infos:
            return 0
        safe: tuple[int, int] | None = None
        for info in infos:
            group = _text(info["name"])
            # The group's consumers may acknowledge between XINFO and XPENDING: min is None then.
            first = self.client.xpending(self.key, group)["min"] if int(info["pending"]) else None
            if first is not None:
                oldest = _id_tuple(first)
            else:  # everything delivered is acknowledged: keep what comes after it
                ms, seq = _id_tuple(info["last-delivered-id"])
                oldest = (ms, seq + 1)
            safe = oldest if safe is None else min(safe, oldest)
        assert safe is not None
        return int(self.client.xtrim(self.key, minid=f"{safe[0]}-{safe[1]}", approximate=False))

    def delete(self) -> None:
        """Remove the stream, its groups, counters and seen ids (a demo starting afresh)."""
        keys = [self.key, self.produced_key]
        for prefix in (self._acked_prefix, self._seen_prefix):
            keys += list(self.client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            self.client.delete(*keys[i : i + 1000])

    def length(self) -> int:
        """Entries held now."""
        return int(self.client.xlen(self.key))

    def produced(self) -> int:
        """Events appended since the stream was created."""
        return int(self.client.get(self.produced_key) or 0)

    def lag(self) -> list[GroupLag]:
        """Per consumer group: events not acknowledged yet, and how old the oldest one is."""
        produced = self.produced()
        now_ms = time.time() * 1000
        out = []
        for info in self._group_infos():
            group = _text(info["name"])
            acked = int(self.client.get(self._acked_prefix + group) or 0)
            pending = int(info["pending"])
            first = self.client.xpending(self.key, group)["min"] if pending else None
            if first is not None:  # (None: acknowledged between XINFO and XPENDING)
                oldest = _id_tuple(first)
            else:
                last = _text(info["last-delivered-id"])
                nxt = self.client.xrange(self.key, min=f"({last}", max="+", count=1)
                oldest = _id_tuple(nxt[0][0]) if nxt else None
            age = 0.0 if oldest is None else max(0.0, (now_ms - oldest[0]) / 1000)
            out.append(GroupLag(group, max(0, produced - acked), pending, age))
        return out
