"""UserHistories: every user's events, time-sorted, and "what happened strictly before t".

One flat set of arrays sorted by (user, timestamp) plus per-user offsets. Point lookups are a
vectorised searchsorted: no Python loop over users or rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fm.timefeatures import timestamps_us

# timestamps_us lives in fm.timefeatures; re-exported for callers that import it from here.
__all__ = ["History", "UserHistories", "surface_codes", "timestamps_us"]


def surface_codes(surface: np.ndarray, surfaces: list[str]) -> np.ndarray:
    """Map surface names to their index in `surfaces`; unknown names raise."""
    names = np.asarray(surfaces, dtype=object)
    order = np.argsort(names)
    pos = np.searchsorted(names[order], np.asarray(surface, dtype=object))
    pos = np.minimum(pos, len(names) - 1)
    codes = order[pos]
    bad = names[codes] != np.asarray(surface, dtype=object)
    if bad.any():
        raise ValueError(f"unknown surfaces: {sorted(set(np.asarray(surface)[bad]))}")
    return codes.astype(np.int64)


@dataclass
class History:
    """One user's events before some time, oldest first."""

    ts_us: np.ndarray  # int64
    item: np.ndarray  # int64
    action: np.ndarray  # int64
    surface: np.ndarray  # int64 code into UserHistories.surfaces

    def __len__(self) -> int:
        return len(self.ts_us)


class UserHistories:
    def __init__(
        self,
        users: np.ndarray,
        offsets: np.ndarray,
        ts_us: np.ndarray,
        item: np.ndarray,
        action: np.ndarray,
        surface: np.ndarray,
        surfaces: list[str],
    ) -> None:
        """Item ids are kept as logged (any int64): the model maps ids outside its vocabulary
        to its OOV row. There is no hour: the FM derives it from ts_us (fm.timefeatures)."""
        self.users = users  # [U] sorted unique user ids
        self.offsets = offsets  # [U + 1] user u's events are rows offsets[u]:offsets[u+1]
        self.ts_us, self.item, self.action = ts_us, item, action  # [E], sorted by (user, ts)
        self.surface = surface  # [E]
        self.surfaces = list(surfaces)
        # Search key: (user index, rank of ts among distinct timestamps) packed in one int64.
        # Ranks are < E, so this never overflows, and it keeps "strictly before" exact.
        self._uniq_ts = np.unique(ts_us)
        self._stride = np.int64(len(self._uniq_ts) + 1)
        user_idx = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(offsets))
        self._key = user_idx * self._stride + np.searchsorted(self._uniq_ts, ts_us)

    @classmethod
    def from_events(cls, df: pd.DataFrame, surfaces: list[str] | None = None) -> UserHistories:
        """Build from an event log; `surfaces` fixes the surface codes (the FM's order).

        Reads user_id, item_id, event_timestamp, surface and action; an `hour` column, if
        any, is ignored (the FM derives the hour from the timestamp)."""
        surfaces = list(surfaces) if surfaces is not None else sorted(df["surface"].unique())
        user = df["user_id"].to_numpy(np.int64)
        ts = timestamps_us(df["event_timestamp"])
        item = df["item_id"].to_numpy(np.int64)
        action = df["action"].to_numpy(np.int64)
        surface = surface_codes(df["surface"].to_numpy(object), surfaces)
        # By user, then time; events at one instant by (item, action, surface), never by
        # their row order: online histories (Redis) give ties the same order, so a TAE is the
        # same whichever source its history came from.
        order = np.lexsort((surface, action, item, ts, user))
        user = user[order]
        users, starts = np.unique(user, return_index=True)
        offsets = np.append(starts, len(user)).astype(np.int64)
        return cls(
            users=users,
            offsets=offsets,
            ts_us=ts[order],
            item=item[order],
            action=action[order],
            surface=surface[order],
            surfaces=surfaces,
        )

    def __len__(self) -> int:
        return len(self.ts_us)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def lookup(
        self, user_ids: np.ndarray, ts_us: np.ndarray, max_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each query, the most recent <= max_len events strictly before ts_us.

        Returns (end, length), both int64 [Q]: the events are rows end-length .. end-1.
        Unknown users get length 0.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        ts_us = np.asarray(ts_us, dtype=np.int64)
        if len(self.users) == 0:
            return np.zeros(len(user_ids), np.int64), np.zeros(len(user_ids), np.int64)
        u = np.searchsorted(self.users, user_ids)
        known = (u < len(self.users)) & (self.users[np.minimum(u, len(self.users) - 1)] == user_ids)
        u = np.where(known, u, 0)
        key = u * self._stride + np.searchsorted(self._uniq_ts, ts_us, side="left")
        end = np.searchsorted(self._key, key, side="left")  # first event at or after ts
        start = self.offsets[u]
        length = np.where(known, np.minimum(end - start, max_len), 0)
        return np.where(known, end, 0).astype(np.int64), length.astype(np.int64)

    def before(self, user_id: int, ts_us: int, max_len: int) -> History:
        """The user's most recent <= max_len events with timestamp strictly before ts_us."""
        end, length = self.lookup(np.array([user_id]), np.array([ts_us]), max_len)
        rows = slice(int(end[0] - length[0]), int(end[0]))
        return History(
            self.ts_us[rows],
            self.item[rows],
            self.action[rows],
            self.surface[rows],
        )
