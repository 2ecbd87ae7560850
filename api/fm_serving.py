"""Read-through: TAEs missing from Redis, computed on the fly by the FM tier and written back.

One engine per FM version (keyed by the checkpoint digest, loaded lazily on first need and
kept), all sharing one UserHistories built from the repo's event log. Without an event log
(or a loadable checkpoint) there is nothing to compute from: missing rows stay missing.

A request is computed with the very version it read, never another one. Items outside the
FM's vocabulary cannot be embedded and stay missing too.
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

    def compute(
        self,
        version: FMVersion,
        user_id: int,
        item_ids: np.ndarray,
        surface: str | None,
        now: datetime,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(positions into item_ids that were computed, their [k, dim] TAEs), or None."""
        eng = self._engine(version)
        if eng is None:
            return None
        items = np.asarray(item_ids, dtype=np.int64)
        ok = np.flatnonzero((items > 0) & (items < eng.n_items))
        if len(ok) == 0:
            return ok, np.zeros((0, version.dim), dtype=np.float32)
        surface = surface or eng.surfaces[0]
        ts_us = int(now.astimezone(UTC).timestamp() * 1_000_000)
        with eng.lock:  # one forward at a time per version: torch modules are not re-entrant
            matrix = eng.engine.compute_request(user_id, ts_us, surface, now.hour, items[ok])
        finite = np.isfinite(matrix).all(axis=1)
        return ok[finite], matrix[finite]

    def clear(self) -> None:
        with self._lock:
            self._engines.clear()
            self._histories = None
            self._histories_loaded = False
