"""The FM inference tier: a published version's model turned into TAEs. Logging
(`load_tae_function`, an offline job over the whole event log, cut at each impression's time)
and the service's read-through (`FMTier`, each user's recent history read from Redis per
request: `store_bridge.streams.histories`) share it.

Time features are the FM's own business: the engine derives the hour of day from each row's
timestamp in the time zone its config records (`FMConfig.time_zone`), so logged, trained and
served TAEs of one instant agree. Items outside the FM's vocabulary are reported, never fed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from fm import TAEEngine, UserHistories, load_checkpoint
from fm.inference import CacheStats
from fm.timefeatures import to_us
from store_bridge.events.schema import DatasetSpec
from store_bridge.repo import FeatureRepo, FMVersion
from store_bridge.streams.histories import OnlineHistories


def repo_histories(repo: FeatureRepo) -> UserHistories | None:
    """Every user's history from the repo's event log (surface codes in the dataset's order);
    None when the repo has no event log."""
    events_path, spec_path = repo.events_dir / "events.parquet", repo.events_dir / "spec.json"
    if not (events_path.is_file() and spec_path.is_file()):
        return None
    spec = DatasetSpec.load(spec_path)
    return UserHistories.from_events(pd.read_parquet(events_path), spec.surfaces)


def load_engine(
    repo: FeatureRepo, version: FMVersion, histories: UserHistories | None, *,
    surfaces: list[str] | None = None, history_cache: bool = False,
) -> TAEEngine:  # fmt: skip
    """The version's TAE engine (serving artifact where there is one), reading `histories`, or
    without histories of its own (None: each call passes them, their surfaces coded in
    `surfaces`). ValueError when the model does not fit the version or the histories."""
    model, _ = load_checkpoint(version.model_path(repo))
    coded = histories.surfaces if histories is not None else surfaces
    if coded is None:
        raise TypeError("load_engine needs histories or the surfaces they will be coded in")
    if list(coded) != model.config.surfaces:
        # Surface ids are positions in these lists; a mismatch would silently swap surfaces.
        raise ValueError(
            f"FM {version.version} knows surfaces {model.config.surfaces}, "
            f"the histories encode {list(coded)}"
        )
    if model.config.d_model != version.dim:
        raise ValueError(
            f"FM {version.version} is published as {version.dim}-d, its model is "
            f"{model.config.d_model}-d"
        )
    return TAEEngine(model, histories, history_cache=history_cache)


class EngineTAEFunction:
    """A `TAEFunction` over a TAEEngine: (users, items, ts_us, surfaces) -> [n, d] float32,
    and `known_items` so that the logging tier skips (and counts) items the FM does not know.
    The hour of day comes from ts_us inside the engine, in the FM's own time zone."""

    def __init__(self, engine: TAEEngine) -> None:
        self.engine = engine

    def known_items(self, item_ids: np.ndarray) -> np.ndarray:
        """bool [n]: ids inside the FM's vocabulary [0, n_items)."""
        return self.engine.known_items(np.asarray(item_ids))

    def __call__(
        self, users: np.ndarray, items: np.ndarray, ts_us: np.ndarray, surfaces: np.ndarray
    ) -> np.ndarray:
        return self.engine.compute(
            np.asarray(users), np.asarray(items), np.asarray(ts_us), np.asarray(surfaces)
        )


def load_tae_function(
    repo: FeatureRepo, version: FMVersion, histories: UserHistories
) -> EngineTAEFunction:
    """TAEs of `version` for (user, item, time) rows, with history taken from `histories`."""
    return EngineTAEFunction(load_engine(repo, version, histories))


# Read-through: TAEs missing from the online store, computed on the fly and written back.
#
# One engine per FM version (keyed by the checkpoint digest, loaded lazily on first need and
# kept). The tier holds no event log: each request reads its user's recent history from Redis
# (`OnlineHistories`, kept current by the `histories` stream consumer) in one round trip, and
# the version's engine computes against that one-user history. Without online histories (the
# repo has no dataset spec) or a loadable checkpoint there is nothing to compute from: missing
# rows stay missing.
#
# A request is computed with the very version it read, never another one. Items outside the
# FM's vocabulary (ids outside 0..n_items-1; 0 is a real item) cannot be embedded and stay
# missing too. Only users with a stored history are computed: a TAE computed for an arbitrary
# id would be written back, and any client could fill the online store with rows for users
# that do not exist.

log = logging.getLogger("foundex.api.fm")

HistoriesSource = OnlineHistories | Callable[[], OnlineHistories | None] | None


@dataclass
class Computed:
    """What read-through computed for one request's missing candidates."""

    positions: np.ndarray  # int64 [k]: indices into the item_ids given, ascending
    taes: np.ndarray  # float32 [k, dim], all finite
    unknown_user: bool = False  # no history for the user: nothing was computed
    unknown_items: int = 0  # candidates outside the FM's vocabulary, not computed


@dataclass
class _Engine:
    engine: TAEEngine
    n_items: int
    surfaces: list[str]
    lock: threading.Lock


class FMTier:
    """Lazily loaded TAE engines per FM version over the online histories (thread-safe)."""

    def __init__(self, repo: FeatureRepo, histories: HistoriesSource = None) -> None:
        """histories: the online histories, or a callable that builds them on first need
        (None from it, or None here: read-through is off). A callable keeps a caller that
        never computes from touching Redis or the dataset spec."""
        self.repo = repo
        self._source = histories
        self._engines: dict[tuple[str, str], _Engine | None] = {}
        self._histories: OnlineHistories | None = None
        self._histories_loaded = False
        self._lock = threading.Lock()

    def _load_histories(self) -> OnlineHistories | None:
        """The online histories (built once; call with self._lock held)."""
        if not self._histories_loaded:
            src = self._source
            self._histories = src() if callable(src) else src
            if self._histories is None:
                log.warning(
                    "read-through off: no online histories (they need a dataset spec at %s)",
                    self.repo.events_dir / "spec.json",
                )
            self._histories_loaded = True
        return self._histories

    def _online(self) -> OnlineHistories | None:
        with self._lock:
            return self._load_histories()

    def _engine(self, version: FMVersion) -> _Engine | None:
        key = (version.version, version.digest)
        with self._lock:
            if key in self._engines:
                return self._engines[key]
            self._engines[key] = None
            histories = self._load_histories()
            if histories is None:
                return None
            try:
                # No histories of its own: each request passes its user's. The history cache
                # keeps each user's encoded history across requests until it changes.
                engine = load_engine(
                    self.repo, version, None, surfaces=histories.surfaces, history_cache=True
                )
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                log.warning("read-through off for %s: %s", version.version, e)
                return None
            cfg = engine.config
            if cfg.max_history > histories.cap:
                # Redis keeps only the newest `cap` events per user: this FM would see less
                # history online than it was trained and is logged with.
                log.warning(
                    "FM %s reads up to %d history events but online histories keep %d per "
                    "user (history_cap): its served TAEs see shortened histories",
                    version.version, cfg.max_history, histories.cap,
                )  # fmt: skip
            eng = _Engine(engine, cfg.n_items, list(cfg.surfaces), threading.Lock())
            self._engines[key] = eng
            return eng

    def surfaces(self, version: FMVersion) -> list[str] | None:
        """The version's surfaces; None when it cannot be computed here."""
        eng = self._engine(version)
        return None if eng is None else eng.surfaces

    def cache_stats(self, version: FMVersion) -> CacheStats | None:
        """The version's history-cache counters (hits, misses, invalidations, evictions);
        None when its engine is not loaded."""
        eng = self._engines.get((version.version, version.digest))
        return None if eng is None or eng.engine.cache is None else eng.engine.cache.stats

    def knows_user(self, user_id: int) -> bool:
        """Whether the online histories hold any event of this user (one Redis call; False
        without online histories). Raises redis errors."""
        histories = self._online()
        return histories is not None and histories.knows(user_id)

    def compute(
        self,
        version: FMVersion,
        user_id: int,
        item_ids: np.ndarray,
        surface: str,
        now: datetime | int,
    ) -> Computed | None:
        """TAEs of `item_ids` for one user on `surface` (one of `surfaces(version)`; the
        caller picks the default) as of `now` (a datetime, or int µs since the epoch), from
        the user's online history as it is now (one Redis round trip; events at or after
        `now` are cut); None when the version cannot be computed here (no online histories,
        no loadable checkpoint). Items outside the vocabulary and rows that come out
        non-finite are left out of `positions`. Raises redis errors."""
        eng = self._engine(version)
        if eng is None:
            return None
        online = self._online()
        if online is None:  # cleared since, and the spec is gone
            return None
        items = np.asarray(item_ids, dtype=np.int64)
        none = np.zeros(0, dtype=np.int64)
        histories, history_version = online.user_histories(user_id)
        if len(histories) == 0:
            return Computed(none, np.zeros((0, version.dim), np.float32), unknown_user=True)
        ok = np.flatnonzero(eng.engine.known_items(items))  # [0, n_items): 0 is an item
        unknown = len(items) - len(ok)
        if len(ok) == 0:
            return Computed(none, np.zeros((0, version.dim), np.float32), unknown_items=unknown)
        ts_us = now if isinstance(now, int) else to_us(now)
        with eng.lock:  # one forward at a time per version: torch modules are not re-entrant
            matrix = eng.engine.compute_request(
                user_id, ts_us, surface, items[ok],
                histories=histories, history_version=history_version,
            )  # fmt: skip
        finite = np.isfinite(matrix).all(axis=1)
        return Computed(ok[finite], matrix[finite], unknown_items=unknown)

    def clear(self) -> None:
        """Forget loaded engines (and their history caches) and the online histories: the
        next call builds them afresh."""
        with self._lock:
            self._engines.clear()
            self._histories = None
            self._histories_loaded = False
