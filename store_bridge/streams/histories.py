"""Online histories: each user's most recent events in Redis, all surfaces, capped per user.

This is what the FM serving tier reads instead of the event log, so a serving process holds no
log and an event is visible to the next TAE computed for its user.

Layout, per user u of the repo's Feast project p:

    foundex:p:hist:{u}    sorted set; score = event time (int µs since the epoch, exact in a
                          double below 2^53), member = 19 packed bytes (HISTORY_ROW: item, action,
                          surface code, event-id hash; ordered so that events at one instant
                          sort by item, action, surface, as in the event log's histories)
    foundex:p:histv:{u}   counter bumped whenever the user's set gains an event: a reader that
                          cached something derived from the history compares it

Idempotent: the member carries a hash of the event id, so adding an event twice leaves one row
(ZADD of an existing member adds nothing). Surface codes are positions in the dataset's
surfaces (`DatasetSpec.surfaces`), the order the FM's surface ids follow.

Single Redis only: the batch write is one server-side script over many users' keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import redis

from fm.history import UserHistories, surface_codes
from fm.timefeatures import timestamps_us
from store_bridge.streams.consumer import StreamConsumer
from store_bridge.streams.records import EVENT_ID, content_ids, id_hashes
from store_bridge.streams.stream import Entry, RedisStream

# Big-endian keys with the sign bit flipped: the bytes of two members compare as (item,
# action, surface) compare as numbers, so events at one instant are in the order
# `fm.UserHistories.from_events` gives them (the same TAEs from either source).
HISTORY_ROW = np.dtype([("item", ">u8"), ("action", ">u2"), ("surface", "u1"), ("eid", "<u8")])
_ITEM_FLIP, _ACTION_FLIP = np.uint64(1 << 63), np.uint16(1 << 15)

# ARGV: cap, ttl_s, row width, then per user: key, version key, members (k packed rows, one
# string), scores (k decimal µs, comma-separated). "Added" counts only events that were not
# stored and are still stored after the cap is applied: re-adding an event the cap already
# dropped changes nothing, version included.
_ADD = """
local cap, ttl, w = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local total = 0
for i = 4, #ARGV, 4 do
  local key, vkey, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local args, members, j = {}, {}, 0
  for score in string.gmatch(ARGV[i + 3], '[^,]+') do
    local m = string.sub(blob, j * w + 1, (j + 1) * w)
    j = j + 1
    args[#args + 1] = score
    args[#args + 1] = m
    members[j] = m
  end
  local before = redis.call('ZMSCORE', key, unpack(members))
  local fresh = {}
  for n, s in ipairs(before) do
    if not s then fresh[#fresh + 1] = members[n] end
  end
  if #fresh > 0 then
    redis.call('ZADD', key, unpack(args))
    local kept = #fresh
    if redis.call('ZCARD', key) > cap then
      redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
      kept = 0
      for _, s in ipairs(redis.call('ZMSCORE', key, unpack(fresh))) do
        if s then kept = kept + 1 end
      end
    end
    if kept > 0 then
      redis.call('INCRBY', vkey, kept)
      total = total + kept
    end
  end
  if ttl > 0 then
    redis.call('EXPIRE', key, ttl)
    redis.call('EXPIRE', vkey, ttl)
  end
end
return total
"""

# Lua's unpack is bounded by the C stack: keep a user's slice of one call well inside it.
_MAX_ROWS_PER_CALL = 2000


@dataclass
class OnlineHistory:
    """One user's stored events, oldest first."""

    ts_us: np.ndarray  # int64 [n]
    item: np.ndarray  # int64 [n]
    action: np.ndarray  # int64 [n]
    surface: np.ndarray  # int64 [n], codes into OnlineHistories.surfaces
    version: int  # the user's counter: changes whenever events were added

    def __len__(self) -> int:
        return len(self.ts_us)


class OnlineHistories:
    """The per-user recent histories of one repo in Redis (see the module docstring)."""

    def __init__(
        self, client: redis.Redis, project: str, surfaces: list[str], *, cap: int = 256,
        ttl_s: int = 0,
    ) -> None:  # fmt: skip
        """cap: events kept per user (the newest); it must be at least the largest
        `max_history` of the FMs that read it. ttl_s: a user's history expires this long
        after its last event (0: never)."""
        if cap < 1:
            raise ValueError(f"history cap must be >= 1, got {cap}")
        if len(surfaces) > 255:
            raise ValueError(f"at most 255 surfaces fit a history row, got {len(surfaces)}")
        self.client = client
        self.project = project
        self.surfaces = list(surfaces)
        self.cap, self.ttl_s = int(cap), int(ttl_s)
        self._add = client.register_script(_ADD)

    def key(self, user_id: int) -> str:
        return f"foundex:{self.project}:hist:{{{int(user_id)}}}"

    def version_key(self, user_id: int) -> str:
        return f"foundex:{self.project}:histv:{{{int(user_id)}}}"

    # --- writing ---------------------------------------------------------------------------

    def add(self, events: pa.Table | pd.DataFrame) -> int:
        """Add events (columns user_id, item_id, event_timestamp, surface, action and,
        optionally, event_id: derived from the content where absent) -> rows newly added.
        Raises ValueError for a surface outside `surfaces`."""
        df = events.to_pandas() if isinstance(events, pa.Table) else events
        if len(df) == 0:
            return 0
        user = df["user_id"].to_numpy(np.int64)
        item = df["item_id"].to_numpy(np.int64)
        ts = timestamps_us(df["event_timestamp"])
        action = df["action"].to_numpy(np.int64)
        surf_names = df["surface"].to_numpy(object)
        surface = surface_codes(surf_names, self.surfaces)
        if EVENT_ID in df.columns:
            ids = df[EVENT_ID].to_numpy(object)
        else:
            ids = content_ids(user, item, ts, surf_names, action)
        rows = np.empty(len(df), dtype=HISTORY_ROW)
        rows["item"] = item.astype(np.uint64) ^ _ITEM_FLIP
        rows["action"] = action.astype(np.int16).astype(np.uint16) ^ _ACTION_FLIP
        rows["surface"], rows["eid"] = surface, id_hashes(ids)
        order = np.argsort(user, kind="stable")
        rows, ts, user = rows[order], ts[order], user[order]
        bounds = np.flatnonzero(np.r_[True, user[1:] != user[:-1], True])
        head = [self.cap, self.ttl_s, HISTORY_ROW.itemsize]
        total, args, n_rows = 0, list(head), 0
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            for c in range(a, b, _MAX_ROWS_PER_CALL):
                d = min(b, c + _MAX_ROWS_PER_CALL)
                u = int(user[a])
                args += [self.key(u), self.version_key(u), rows[c:d].tobytes(),
                         ",".join(map(str, ts[c:d].tolist()))]  # fmt: skip
                n_rows += d - c
                if n_rows >= _MAX_ROWS_PER_CALL:
                    total += int(self._add(args=args))
                    args, n_rows = list(head), 0
        if n_rows:
            total += int(self._add(args=args))
        return total

    def backfill(self, events: pd.DataFrame) -> int:
        """Seed from an event log: each user's newest `cap` events -> rows newly added.
        Idempotent (a second run adds nothing)."""
        if len(events) == 0:
            return 0
        ts = timestamps_us(events["event_timestamp"])
        user = events["user_id"].to_numpy(np.int64)
        order = np.lexsort((ts, user))
        # rank from the end within each user: keep the newest `cap`
        u = user[order]
        starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
        ends = np.r_[starts[1:], len(u)]
        from_end = np.repeat(ends, ends - starts) - np.arange(len(u))
        keep = order[from_end <= self.cap]
        return self.add(events.iloc[np.sort(keep)])

    # --- reading ---------------------------------------------------------------------------

    def read_many(self, user_ids: np.ndarray) -> list[OnlineHistory]:
        """Stored events of several users (one pipeline), in the order given."""
        users = [int(u) for u in np.asarray(user_ids, dtype=np.int64).reshape(-1)]
        pipe = self.client.pipeline(transaction=False)
        for u in users:
            pipe.zrange(self.key(u), 0, -1, withscores=True)
            pipe.get(self.version_key(u))
        res = pipe.execute()
        n_surfaces = len(self.surfaces)
        return [_decode(res[2 * i], res[2 * i + 1], n_surfaces) for i in range(len(users))]

    def read(self, user_id: int) -> OnlineHistory:
        """The user's stored events, oldest first (empty for an unknown user)."""
        return self.read_many(np.array([user_id]))[0]

    def histories_for(self, user_ids: np.ndarray) -> tuple[UserHistories, dict[int, int]]:
        """The stored events of these users as one `UserHistories` (what the TAE engine
        reads; users without events are left out), and each user's version counter."""
        users = np.unique(np.asarray(user_ids, dtype=np.int64))
        hs = self.read_many(users)
        have = [(int(u), h) for u, h in zip(users.tolist(), hs, strict=True) if len(h)]
        lengths = np.array([len(h) for _, h in have], dtype=np.int64)

        def cat(field: str) -> np.ndarray:
            parts = [getattr(h, field) for _, h in have]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        histories = UserHistories(
            users=np.array([u for u, _ in have], dtype=np.int64),
            offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
            ts_us=cat("ts_us"), item=cat("item"), action=cat("action"), surface=cat("surface"),
            surfaces=self.surfaces,
        )  # fmt: skip
        return histories, {int(u): h.version for u, h in zip(users.tolist(), hs, strict=True)}

    def user_histories(self, user_id: int) -> tuple[UserHistories, int]:
        """One user's stored events as a `UserHistories`, with the user's version counter."""
        histories, versions = self.histories_for(np.array([user_id]))
        return histories, versions[int(user_id)]

    def clear(self) -> int:
        """Delete every user's history and version counter of this project -> keys deleted
        (a demo starting afresh; a layout change)."""
        deleted = 0
        for pattern in (f"foundex:{self.project}:hist:*", f"foundex:{self.project}:histv:*"):
            batch: list = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(self.client.delete(*batch))
                    batch = []
            if batch:
                deleted += int(self.client.delete(*batch))
        return deleted

    def latest_us(self, user_id: int, *, before_us: int | None = None) -> int | None:
        """The time (µs since the epoch) of the user's newest stored event, or of the newest
        strictly before `before_us`; None when there is none. One Redis call; raises redis
        errors."""
        key = self.key(user_id)
        if before_us is None:
            top = self.client.zrange(key, -1, -1, withscores=True)
        else:
            top = self.client.zrevrangebyscore(
                key, f"({int(before_us)}", "-inf", start=0, num=1, withscores=True
            )
        return int(top[0][1]) if top else None

    def knows(self, user_id: int) -> bool:
        """Whether any event of the user is stored."""
        return bool(self.client.exists(self.key(user_id)))


def _decode(pairs: list, version: bytes | None, n_surfaces: int) -> OnlineHistory:
    n = len(pairs)
    if any(len(m) != HISTORY_ROW.itemsize for m, _ in pairs):
        raise ValueError(
            f"online history rows are not {HISTORY_ROW.itemsize}-byte HISTORY_ROWs: written by "
            "another foundex layout; clear them (OnlineHistories.clear) and backfill again"
        )
    rows = np.frombuffer(b"".join(m for m, _ in pairs), dtype=HISTORY_ROW, count=n)
    if n and int(rows["surface"].max()) >= n_surfaces:
        raise ValueError(
            f"online history holds surface code {int(rows['surface'].max())} but the dataset "
            f"has {n_surfaces} surfaces: clear the histories and backfill again"
        )
    ts = np.fromiter((s for _, s in pairs), dtype=np.float64, count=n).astype(np.int64)
    return OnlineHistory(
        ts_us=ts,
        item=(rows["item"] ^ _ITEM_FLIP).astype(np.uint64).view(np.int64),
        action=(rows["action"] ^ _ACTION_FLIP).astype(np.uint16).view(np.int16).astype(np.int64),
        surface=rows["surface"].astype(np.int64),
        version=int(version or 0),
    )


class HistoriesConsumer(StreamConsumer):
    """The `histories` role: every event of the events stream into its user's online history
    (idempotent: re-adding an event adds nothing)."""

    group = "histories"

    def __init__(self, stream: RedisStream, histories: OnlineHistories, **kw) -> None:
        super().__init__(stream, **kw)
        self.histories = histories

    def handle(self, entries: list[Entry]) -> None:
        tables = [e.table for e in entries if e.table is not None and e.table.num_rows]
        if tables:
            self.histories.add(pa.concat_tables(tables, promote_options="default"))
