"""Online embedding store: a small interface and its Redis implementation in Feast's layout.

Reads decode Feast's stored float_list values straight into one float32 matrix (see
feast_layout); writes produce the bytes Feast itself would, so `get_online_features` reads
what foundex wrote and foundex reads what `feast materialize` wrote.

The client may be a `redis.Redis` or a `redis.cluster.RedisCluster`. On a single Redis, reads
and writes of a batch are one server-side script call each; on a cluster, whose keys span slots,
they go through the client's non-transactional pipeline, split per node by key slot.

A read may also report which served rows are stale: given `newer_than` (a time, or the newest
event of a user's online history before the request time: `NewestEvent`), rows whose stored
event time (`_ts:<view>`) is not newer than it, or is absent or unreadable, come back in
`EmbeddingRows.stale` (read-through recomputes them). On a single Redis the newest event, the
values and the times come from one script call; a read that does not ask keeps its
single-field script.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import redis
import redis.cluster

from store_bridge.feast_layout import (
    TIMESTAMP_WIDTH,
    decode_float_lists,
    decode_timestamp_us,
    encode_float_lists,
    encode_timestamp_us,
    entity_key_prefix,
    entity_keys,
    feature_field,
    float_list_rows,
    timestamp_records_us,
    ts_field,
)
from store_bridge.repo import view_name

EMBEDDING = "embedding"


class StoreUnavailable(RuntimeError):
    """The online store did not answer (down, unreachable or timed out)."""


@dataclass
class EmbeddingRows:
    matrix: np.ndarray  # [n, dim] float32, NaN rows where missing
    missing: list[int]  # indices into the requested item_ids, ascending
    # The subset of `missing` whose stored bytes were unusable (not a float_list Value of
    # this width, truncated, NaN or Inf): served as missing, counted apart by the caller.
    undecodable: list[int] = field(default_factory=list)
    # Only when the read was given `newer_than`: indices of served (not missing) rows whose
    # stored event time is at or before `newer_than_us`, or absent or unreadable; ascending.
    stale: list[int] = field(default_factory=list)
    # The time (µs) the rows were compared with; None: not compared (nothing asked, or no
    # event before the request time).
    newer_than_us: int | None = None


@dataclass(frozen=True)
class NewestEvent:
    """A read's `newer_than`: the newest score strictly before `before_us` in the Redis sorted
    set `key`, whose scores are event times (µs since the epoch; a user's online history,
    `store_bridge.streams.histories`). No such event: no row is compared."""

    key: str
    before_us: int


class EmbeddingStore(ABC):
    """Where one FM version's TAEs live online, keyed by (user, item)."""

    @abstractmethod
    def read(
        self, version: str, dim: int, user_id: int, item_ids: np.ndarray, *,
        newer_than: int | NewestEvent | None = None,
    ) -> EmbeddingRows:  # fmt: skip
        """TAEs of `item_ids` for one user, in order; missing rows reported by index.

        A stored row that cannot be decoded is reported as missing (and in `undecodable`)
        rather than failing the read. With `newer_than` (µs since the epoch, or a NewestEvent
        to look up), served rows whose stored event time is not newer than it, or is absent
        or unreadable, are also reported in `stale`. Raises StoreUnavailable when the store
        does not answer.
        """

    @abstractmethod
    def write(
        self,
        version: str,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        ts_us: np.ndarray,
        matrix: np.ndarray,
    ) -> int:
        """Write rows (latest event time wins per key); returns how many were written."""

    @abstractmethod
    def ping(self) -> bool: ...


class RedisEmbeddingStore(EmbeddingStore):
    def __init__(self, client: redis.Redis | redis.cluster.RedisCluster, project: str) -> None:
        self.client = client
        self.project = project
        self._cas = None  # the registered write script, on first scripted write
        self._hget_all = None  # the registered read script, on first read
        self._hget_fresh = None  # the one that also compares event times, on first such read
        self._single_node = not isinstance(client, redis.cluster.RedisCluster)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e

    def read(
        self, version: str, dim: int, user_id: int, item_ids: np.ndarray, *,
        newer_than: int | NewestEvent | None = None,
    ) -> EmbeddingRows:  # fmt: skip
        items = np.asarray(item_ids, dtype=np.int64)
        keys = entity_keys(self.project, {"user_id": np.full(len(items), user_id), "item_id": items})
        view = view_name(version)
        field = feature_field(view, EMBEDDING)
        stale: list[int] = []
        after = None
        try:
            if newer_than is None:
                values = self._read_values(keys, field)
            else:
                values, stale, after = self._read_with_times(keys, field, ts_field(view), newer_than)
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        rows = decode_float_lists(values, dim)
        if stale and rows.missing:  # bytes that did not decode are missing, not stale
            gone = set(rows.missing)
            stale = [i for i in stale if i not in gone]
        return EmbeddingRows(rows.matrix, rows.missing, rows.undecodable, stale, after)

    def _read_values(self, keys: list[bytes], field: bytes) -> list:
        """Each key's stored value of `field` (None: absent; a key holding no hash reads as
        `_NOT_A_HASH`). Raises redis errors."""
        if self._single_node:
            # One EVALSHA for all candidates: spares redis-py packing and parsing N commands
            # (~1 ms instead of ~3 ms for 500). redis-py reloads the script by itself after a
            # server restart (NOSCRIPT).
            if self._hget_all is None:
                self._hget_all = self.client.register_script(_HGET_ALL)
            return self._hget_all(keys=keys, args=[field])
        with self.client.pipeline(transaction=False) as pipe:  # a cluster: per-node pipelines
            for k in keys:
                pipe.hget(k, field)
            return [_wrong_type_as_bad(v) for v in pipe.execute(raise_on_error=False)]

    def _read_with_times(
        self, keys: list[bytes], field: bytes, tfield: bytes, newer_than: int | NewestEvent
    ) -> tuple[list, list[int], int | None]:
        """`_read_values`, the ascending indices of keys holding a value whose event time is
        absent, unreadable or not newer than `newer_than`, and the time compared with (None
        when a NewestEvent found no event: nothing compared). Raises redis errors."""
        if self._single_node:
            # One script call, like the plain read: the newest event is looked up and the
            # times compared server side, so only the (usually empty) list of stale indices
            # and the time travel beside the values.
            if self._hget_fresh is None:
                self._hget_fresh = self.client.register_script(_HGET_FRESH)
            if isinstance(newer_than, NewestEvent):
                keys, args = [*keys, newer_than.key], [int(newer_than.before_us), "newest"]
            else:
                args = [int(newer_than), "at"]
            out = self._hget_fresh(keys=keys, args=[field, tfield, *args])
            return out[0], out[1], (int(out[2]) if len(out) > 2 else None)
        after = newer_than
        if isinstance(newer_than, NewestEvent):  # on its own node: one call more
            top = self.client.zrevrangebyscore(
                newer_than.key, f"({int(newer_than.before_us)}", "-inf", start=0, num=1,
                withscores=True,
            )  # fmt: skip
            if not top:
                return self._read_values(keys, field), [], None
            after = int(top[0][1])
        with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hmget(k, [field, tfield])
            replies = pipe.execute(raise_on_error=False)
        values, stale = [], []
        for i, reply in enumerate(replies):
            value, ts = _wrong_type_as_bad(reply, (_NOT_A_HASH, None))
            values.append(value)
            if value:  # absent (None) and Feast's null (b"") are missing, never stale
                us = None if ts is None else decode_timestamp_us(ts)
                if us is None or us <= after:
                    stale.append(i)
        return values, stale, after

    def write(
        self,
        version: str,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        ts_us: np.ndarray,
        matrix: np.ndarray,
        *,
        chunk: int = 5000,
    ) -> int:
        view = view_name(version)
        field, tfield = feature_field(view, EMBEDDING), ts_field(view)
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        ts_us = np.asarray(ts_us, dtype=np.int64)
        # Latest row per key only: a batch never overwrites a newer value with an older one.
        order = np.lexsort((ts_us, item_ids, user_ids))
        last = np.ones(len(order), dtype=bool)
        if len(order) > 1:
            same_next = (user_ids[order][1:] == user_ids[order][:-1]) & (
                item_ids[order][1:] == item_ids[order][:-1]
            )
            last[:-1] = ~same_next
        keep = order[last]
        # One server-side compare-and-set per chunk where all keys may meet in one script call
        # (a single Redis); on a cluster, keys span slots, so per-node pipelines instead.
        stamps = timestamp_records_us(ts_us) if self._single_node else None
        written = 0
        for start in range(0, len(keep), chunk):
            idx = keep[start : start + chunk]
            keys = entity_keys(self.project, {"user_id": user_ids[idx], "item_id": item_ids[idx]})
            try:
                if stamps is not None:
                    written += self._write_chunk_scripted(
                        keys, matrix[idx], stamps[0][idx], stamps[1][idx], field, tfield
                    )
                else:
                    values = encode_float_lists(matrix[idx])
                    written += self._write_chunk(keys, values, ts_us[idx], field, tfield)
            except redis.RedisError as e:
                raise StoreUnavailable(f"redis: {e}") from e
        return written

    def _write_chunk_scripted(self, keys, matrix, stamps, lengths, field, tfield) -> int:
        # Values and event times travel as two fixed-width blobs rather than one argument
        # per row: parsing ~3 arguments per row cost the server more than the writes did.
        if self._cas is None:
            self._cas = self.client.register_script(_CAS_WRITE)
        values = float_list_rows(matrix)
        times = np.empty((len(keys), 1 + TIMESTAMP_WIDTH), dtype=np.uint8)
        times[:, 0], times[:, 1:] = lengths, stamps
        args = [field, tfield, values.shape[1], times.shape[1], values.tobytes(), times.tobytes()]
        return int(self._cas(keys=keys, args=args))

    def delete_version(self, version: str, *, batch: int = 2000) -> int:
        """Remove one version's fields from every (user, item) hash of this project.

        Other versions' fields in the same hashes stay; Redis drops a hash whose last field
        goes. Returns how many hashes held the version. The same rule as Feast's own
        `delete_table`, which `feast apply` runs for a view the repo no longer defines.
        """
        view = view_name(version)
        fields = [feature_field(view, EMBEDDING), ts_field(view)]
        pattern = _glob_escape(entity_key_prefix(["user_id", "item_id"])) + b"*" + _glob_escape(
            self.project.encode()
        )
        deleted = 0
        try:
            keys = list(self.client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), batch):
                with self.client.pipeline(transaction=False) as pipe:
                    for k in keys[start : start + batch]:
                        pipe.hdel(k, *fields)
                    deleted += sum(1 for n in pipe.execute() if n)
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return deleted

    def _write_chunk(self, keys, values, ts_us, field, tfield) -> int:
        # Two round trips, as Feast's own writer does: read stored event times, then write
        # only rows that are newer, so reruns and late batches never roll a value back.
        with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hget(k, tfield)
            stored = [_wrong_type_as_bad(v, _SKIP) for v in pipe.execute(raise_on_error=False)]
        written = 0
        with self.client.pipeline(transaction=False) as pipe:
            for k, v, t, old in zip(keys, values, ts_us, stored, strict=True):
                if old is _SKIP:  # the key holds no hash: not ours to overwrite
                    continue
                # An unreadable stored time is overwritten rather than kept forever.
                old_us = None if old is None else decode_timestamp_us(old)
                if old_us is not None and old_us > int(t):
                    continue
                pipe.hset(k, mapping={field: v, tfield: encode_timestamp_us(int(t))})
                written += 1
            pipe.execute()
        return written


# What a key that holds no hash reads as: one zero byte, never a valid Value (field 0 does not
# exist in protobuf), so the row counts as undecodable. (An empty value is Feast's null.)
_NOT_A_HASH = b"\x00"
_SKIP = object()  # the same, for a write: the key is left alone


def _wrong_type_as_bad(value, wrong_type=_NOT_A_HASH):
    """A pipelined HGET's reply: a key that holds no hash (WRONGTYPE) reads as `wrong_type`;
    any other error means the store did not answer (StoreUnavailable)."""
    if isinstance(value, Exception):
        if isinstance(value, redis.ResponseError) and str(value).startswith("WRONGTYPE"):
            return wrong_type
        raise StoreUnavailable(f"redis: {value}") from value
    return value


# A stored event time (a serialized google.protobuf.Timestamp) in µs since 1970, or -1 when
# the bytes are not one (feast_layout.decode_timestamp_us's rules). Microseconds since 1970
# stay below 2^53, exact in Lua's doubles. The scripts below share it.
_LUA_DECODE_TS = """
local function decode_ts(raw)
  local secs, nanos, i, n = 0, 0, 1, #raw
  while i <= n do
    local tag = string.byte(raw, i)
    if tag ~= 8 and tag ~= 16 then return -1 end
    i = i + 1
    local v, mult, b = 0, 1, 128
    while b >= 128 do
      if i > n or mult > 2^63 then return -1 end
      b = string.byte(raw, i)
      i = i + 1
      v = v + (b % 128) * mult
      mult = mult * 128
    end
    if tag == 8 then
      if v >= 2^63 then v = v - 2^64 end
      secs = v
    else
      nanos = v
    end
  end
  if secs < -62135596800 or secs > 253402300799 or nanos >= 1000000000 then return -1 end
  return secs * 1000000 + math.floor(nanos / 1000)
end
"""

# One version's field of every candidate key in one call (single Redis only: the keys of one
# request would span slots on a cluster). A key that holds no hash (WRONGTYPE) reads as
# `_NOT_A_HASH` instead of failing the whole request.
_HGET_ALL = """
local field = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.pcall('HGET', key, field)
  if type(v) == 'table' then v = '\\0' end
  out[i] = v
end
return out
"""

# The same, also comparing each key's event time server side. ARGV: value field, time field, a
# time in µs, and what it is: "at" (the time to compare with) or "newest" (the last key is a
# sorted set of event times, compared with: its newest score strictly before the time; none:
# nothing is compared). Returns {values, stale, time compared with (absent when none)}: values
# as _HGET_ALL returns them; stale the 0-based indices of keys holding a value (not Feast's
# empty null) whose time is absent, unreadable or not newer. One HMGET per key reads both
# fields. Rows written together (a logged request, a write-back) share their time's bytes, so
# each distinct time is decoded once.
_HGET_FRESH = _LUA_DECODE_TS + """
local vf, tf = ARGV[1], ARGV[2]
local n, after = #KEYS, tonumber(ARGV[3])
if ARGV[4] == 'newest' then
  n = n - 1
  local top = redis.pcall('ZREVRANGEBYSCORE', KEYS[#KEYS], '(' .. ARGV[3], '-inf',
                          'WITHSCORES', 'LIMIT', 0, 1)
  after = nil
  if not top.err and top[2] then after = tonumber(top[2]) end
end
local values, stale, verdicts = {}, {}, {}
if after == nil then
  for i = 1, n do
    local v = redis.pcall('HGET', KEYS[i], vf)
    if type(v) == 'table' then v = '\\0' end
    values[i] = v
  end
  return {values, stale}
end
for i = 1, n do
  local got = redis.pcall('HMGET', KEYS[i], vf, tf)
  if got.err then
    values[i] = '\\0'
  else
    local v, t = got[1], got[2]
    values[i] = v
    if v and v ~= '' then
      local old = true  -- no time: of unknown age
      if t then
        old = verdicts[t]
        if old == nil then
          local us = decode_ts(t)
          old = us == -1 or us <= after
          verdicts[t] = old
        end
      end
      if old then stale[#stale + 1] = i - 1 end
    end
  end
end
return {values, stale, after}
"""

# Compare-and-set of one version's rows, server side: for each key, write the value and the
# event time (a serialized google.protobuf.Timestamp, as Feast stores it) unless the stored
# event time is newer. ARGV: value field, time field, value width, time record width, then the
# values (one per key, fixed width) and the time records (a length byte, then the serialized
# Timestamp, zero-padded) as two blobs. Times are decoded only to compare with a stored one;
# microseconds since 1970 stay below 2^53, exact in Lua's doubles. A stored time that is not a
# Timestamp (feast_layout.decode_timestamp_us's rules) decodes as -1, so it is overwritten
# rather than blocking its key forever (or failing the whole batch). A key that holds no hash
# is left alone (not counted as written) rather than failing the batch.
_CAS_WRITE = _LUA_DECODE_TS + """
local vf, tf = ARGV[1], ARGV[2]
local vw, tw = tonumber(ARGV[3]), tonumber(ARGV[4])
local values, times = ARGV[5], ARGV[6]
local sub, byte, call, pcall = string.sub, string.byte, redis.call, redis.pcall
local written = 0
for i = 1, #KEYS do
  local at = (i - 1) * tw + 1
  local ts = sub(times, at + 1, at + byte(times, at))
  local old = pcall('HGET', KEYS[i], tf)
  if type(old) ~= 'table' and ((not old) or decode_ts(old) <= decode_ts(ts)) then
    call('HSET', KEYS[i], vf, sub(values, (i - 1) * vw + 1, i * vw), tf, ts)
    written = written + 1
  end
end
return written
"""


def _glob_escape(raw: bytes) -> bytes:
    """Escape Redis glob metacharacters so binary key bytes match only themselves."""
    out = bytearray()
    for b in raw:
        if b in b"*?[]\\":
            out.append(ord("\\"))
        out.append(b)
    return bytes(out)


def _decode_ts_us(raw: bytes) -> int:
    """A stored event time in microseconds; ValueError if the bytes are not a Timestamp."""
    us = decode_timestamp_us(raw)
    if us is None:
        raise ValueError(f"not a serialized Timestamp: {raw[:16]!r}")
    return us
