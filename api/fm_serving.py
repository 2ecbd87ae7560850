"""Read-through: TAEs missing from Redis, computed on the fly by the FM tier and written back.

One engine per FM version (keyed by the checkpoint digest, loaded lazily on first need and
kept), all sharing one UserHistories built from the repo's event log. Without an event log
(or a loadable checkpoint) there is nothing to compute from: missing rows stay missing.

A request is computed with the very version it read, never another one. Items outside the
FM's vocabulary (ids outside 0..n_items-1; 0 is a real item) cannot be embedded and stay
missing too. Only users with history in the event log are computed: a TAE computed for an
arbitrary id would be written back, and any client could fill the online store with rows for
users that do not exist.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from store_bridge.repo import FeatureRepo, FMVersion

log = logging.getLogger("foundex.api.fm")


@dataclass
class Computed:
    """What read-through computed for one request's missing candidates."""

    positions: np.ndarray  # int64 [k]: indices into the item_ids given, ascending
    taes: np.ndarray  # float32 [k, dim], all finite
    unknown_user: bool = False  # no history for the user: nothing was computed
    unknown_items: int = 0  # candidates outside the FM's vocabulary, not computed


@dataclass
class _Engine:
    engine: object  # fm.TAEEngine
    n_items: int
    surfaces: list[str]
    lock: threading.Lock


class FMTier:
    def __init__(self, repo: FeatureRepo) -> None:
        self.repo = repo
        self._engines: dict[tuple[str, str], _Engine | None] = {}
        self._histories = None
        self._histories_loaded = False
        self._lock = threading.Lock()

    def _load_histories(self):
        if not self._histories_loaded:
            from store_bridge.fm_tier import repo_histories

            self._histories = repo_histories(self.repo)
            if self._histories is None:
                log.warning("read-through off: no event log in %s", self.repo.events_dir)
            self._histories_loaded = True
        return self._histories

    def _engine(self, version: FMVersion) -> _Engine | None:
        key = (version.version, version.digest)
        with self._lock:
            if key in self._engines:
                return self._engines[key]
            self._engines[key] = None
            histories = self._load_histories()
            if histories is None:
                return None
            from store_bridge.fm_tier import load_engine

            try:
                # The history cache keeps each user's encoded history across requests until
                # it grows.
                engine = load_engine(self.repo, version, histories, history_cache=True)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                log.warning("read-through off for %s: %s", version.version, e)
                return None
            cfg = engine.config
            eng = _Engine(engine, cfg.n_items, list(cfg.surfaces),
                          threading.Lock())
            self._engines[key] = eng
            return eng

    def surfaces(self, version: FMVersion) -> list[str] | None:
        eng = self._engine(version)
        return None if eng is None else eng.surfaces

    def knows_user(self, user_id: int) -> bool:
        """Whether the event log holds any event of this user (False without an event log)."""
        with self._lock:
            histories = self._load_histories()
        if histories is None or len(histories.users) == 0:
            return False
        users = histories.users
        i = int(np.searchsorted(users, np.int64(user_id)))
        return i < len(users) and int(users[i]) == user_id

    def compute(
        self,
        version: FMVersion,
        user_id: int,
        item_ids: np.ndarray,
        surface: str | None,
        now: datetime,
    ) -> Computed | None:
        """TAEs of `item_ids` for one user as of `now`; None when the version cannot be
        computed here (no event log, no loadable checkpoint). Items outside the vocabulary and
        rows that come out non-finite are left out of `positions`."""
        eng = self._engine(version)
        if eng is None:
            return None
        items = np.asarray(item_ids, dtype=np.int64)
        none = np.zeros(0, dtype=np.int64)
        if not self.knows_user(user_id):
            return Computed(none, np.zeros((0, version.dim), np.float32), unknown_user=True)
        ok = np.flatnonzero(eng.engine.known_items(items))  # [0, n_items): 0 is an item
        unknown = len(items) - len(ok)
        if len(ok) == 0:
            return Computed(none, np.zeros((0, version.dim), np.float32), unknown_items=unknown)
        surface = surface or eng.surfaces[0]
        ts_us = int(now.astimezone(UTC).timestamp() * 1_000_000)
        with eng.lock:  # one forward at a time per version: torch modules are not re-entrant
            matrix = eng.engine.compute_request(user_id, ts_us, surface, items[ok])
        finite = np.isfinite(matrix).all(axis=1)
        return Computed(ok[finite], matrix[finite], unknown_items=unknown)

    def clear(self) -> None:
        with self._lock:
            self._engines.clear()
            self._histories = None
            self._histories_loaded = False
