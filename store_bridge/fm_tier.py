"""The FM inference tier: a published version's model turned into TAEs. Logging
(`load_tae_function`, an offline job over the whole event log, cut at each impression's time)
and the service's read-through (`FMTier`, each user's recent history read from Redis per
request: `store_bridge.streams.histories`) share it.

Time features are the FM's own business: the engine derives the hour of day from each row's
timestamp in the time zone its config records (`FMConfig.time_zone`), so logged, trained and
served TAEs of one instant agree. Items outside the FM's vocabulary are reported, never fed.

Weight sync (`EngineSync`): within one FM version a streaming trainer publishes deltas and
snapshots (`store_bridge.fm_sync`). Serving (a background check, `FMTier.start_sync`) and
logging (between batches) catch up off the request path: the new weights are built aside in a
copy of the model, then swapped into the engine under the engine's lock, with its history
cache cleared (cached K/V were computed by the old weights). A request therefore computes with
the old model or the new one, never a mix. Seq 0 is the published checkpoint: a version nobody
syncs is served exactly as published.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import redis

from fm import TAEEngine, UserHistories, load_checkpoint
from fm.inference import CacheStats
from fm.timefeatures import to_us
from store_bridge.events.schema import DatasetSpec
from store_bridge.repo import FeatureRepo, FMVersion
from store_bridge.streams.histories import OnlineHistories

if TYPE_CHECKING:  # fm.sync loads torch: the tier loads it with its first model anyway
    import torch.nn as nn

    from fm.sync import SyncedState
    from store_bridge.fm_sync import SyncReader


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


# ---- weight sync within a version ---------------------------------------------------------------


def serving_state(model: nn.Module) -> dict:
    """The model's TAE-path weights as `fm.sync` names them (task heads dropped), sharing the
    model's storage (no copy): serving never writes into its weights, a swap replaces them."""
    from fm.model import FoundationModel

    return {
        k: v.detach()
        for k, v in model.state_dict().items()
        if not FoundationModel.is_head_param(k)
    }


def model_with_state(model: nn.Module, state: dict) -> nn.Module:
    """A copy of `model` (eval mode, same device) holding `state`; `model` is untouched.
    Raises ValueError when the state's names are not the model's TAE path (a sync of another
    architecture)."""
    from fm.model import FoundationModel

    new = copy.deepcopy(model)
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [k for k in missing if not FoundationModel.is_head_param(k)]
    if missing or unexpected:
        raise ValueError(
            f"the synced state does not fit the model: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return new.eval()


@dataclass
class EngineSync:
    """One FM version's sync state beside its TAEEngine: the SyncedState its weights stand at
    and the reader that catches up with the trainer. `synced` stays None (seq 0, the published
    weights, digest not computed) until an update is published for the version.

    Not thread-safe by itself: `update` is called by one thread at a time (the tier's
    background check, or the logging consumer's own loop); requests only read `seq` under the
    engine's lock."""

    reader: SyncReader
    synced: SyncedState | None = None
    swaps: int = 0
    last_error: str | None = None
    last_update_s: float = 0.0  # the last swap's whole update: read, check, apply, build, swap
    last_swap_s: float = 0.0  # of which under the engine's lock (what a request may wait)
    _busy: threading.Lock = field(default_factory=threading.Lock)

    @property
    def seq(self) -> int:
        """The sync sequence the engine's weights stand at (0: the published checkpoint)."""
        return 0 if self.synced is None else self.synced.seq

    @property
    def digest(self) -> str | None:
        """`fm.sync.state_digest` of the engine's weights; None while never synced."""
        return None if self.synced is None else self.synced.digest

    def update(self, engine: TAEEngine, lock: threading.Lock) -> bool:
        """Catch up with the latest published update and swap it into `engine` -> whether
        the weights changed. The new model is built aside; only the swap (a reference and a
        cache clear) holds `lock`. A delta whose base is not the engine's state is refused
        by the reader, which recovers through the last snapshot (`reader.last_problem`).
        Raises redis errors; a state that does not fit the model raises ValueError."""
        from fm.sync import SyncedState, state_digest

        if not self._busy.acquire(blocking=False):  # another check is on it
            return False
        t0 = time.perf_counter()
        try:
            if self.synced is None:
                if self.reader.latest() is None:
                    return False  # never synced: the published checkpoint, seq 0
                state = serving_state(engine.model)
                self.synced = SyncedState(state, 0, state_digest(state))
            current = self.synced
            new = self.reader.catch_up(current)
            if (new.seq, new.digest) == (current.seq, current.digest):
                return False
            model = model_with_state(engine.model, new.state).to(engine.device)
            # the held state shares the new model's storage: no second copy of the weights
            held = SyncedState(serving_state(model), new.seq, new.digest, new.step)
            with lock:
                t_swap = time.perf_counter()
                engine.model = model
                if engine.cache is not None:
                    engine.cache.invalidate()  # K/V of the old weights
                self.synced = held
                self.last_swap_s = time.perf_counter() - t_swap
            self.swaps += 1
            self.last_update_s = time.perf_counter() - t0
            return True
        finally:
            self._busy.release()

    def check(self, engine: TAEEngine, lock: threading.Lock, name: str) -> bool:
        """`update`, with Redis errors and unusable states logged (the engine keeps serving
        the weights it has) -> whether the weights changed."""
        try:
            changed = self.update(engine, lock)
        except (redis.RedisError, OSError, ValueError, RuntimeError) as e:
            if str(e) != self.last_error:
                log.warning("fm_sync %s: cannot catch up, serving seq %d: %s", name, self.seq, e)
            self.last_error = str(e)
            return False
        self.last_error = None
        return changed


def engine_sync(repo: FeatureRepo, client: redis.Redis, project: str, version: str) -> EngineSync:
    """An EngineSync reading `version`'s updates (namespace `project`, as the trainer's
    SyncPublisher writes them)."""
    from store_bridge.fm_sync import SyncReader

    return EngineSync(SyncReader(repo, client, version, project=project))


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
    sync_seq: int = 0  # the weight-sync sequence the TAEs were computed with


@dataclass
class _Engine:
    engine: TAEEngine
    n_items: int
    surfaces: list[str]
    lock: threading.Lock
    sync: EngineSync | None = None  # None: no Redis to read sync updates from


class FMTier:
    """Lazily loaded TAE engines per FM version over the online histories (thread-safe)."""

    def __init__(self, repo: FeatureRepo, histories: HistoriesSource = None) -> None:
        """histories: the online histories, or a callable that builds them on first need
        (None from it, or None here: read-through is off). A callable keeps a caller that
        never computes from touching Redis or the dataset spec. Weight-sync updates are read
        from the histories' Redis, in their project's namespace."""
        self.repo = repo
        self._source = histories
        self._engines: dict[tuple[str, str], _Engine | None] = {}
        self._histories: OnlineHistories | None = None
        self._histories_loaded = False
        self._lock = threading.Lock()
        self._sync_stop = threading.Event()
        self._sync_thread: threading.Thread | None = None

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
            eng.sync = engine_sync(self.repo, histories.client, histories.project, version.version)
            # a cold start serves the latest synced weights from its first request on
            eng.sync.check(eng.engine, eng.lock, version.version)
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
            # (and a sync swap waits for it: the whole request runs on one set of weights)
            matrix = eng.engine.compute_request(
                user_id, ts_us, surface, items[ok],
                histories=histories, history_version=history_version,
            )  # fmt: skip
            seq = 0 if eng.sync is None else eng.sync.seq
        finite = np.isfinite(matrix).all(axis=1)
        return Computed(ok[finite], matrix[finite], unknown_items=unknown, sync_seq=seq)

    # -- weight sync --

    def served_seqs(self) -> dict[str, int]:
        """version -> the sync sequence its loaded engine's weights stand at (0: the published
        checkpoint); versions not loaded here are absent."""
        with self._lock:
            loaded = [(k[0], e) for k, e in self._engines.items() if e is not None]
        return {name: (eng.sync.seq if eng.sync is not None else 0) for name, eng in loaded}

    def sync_state(self, version: FMVersion) -> EngineSync | None:
        """The version's sync state (seq, digest, swaps, the reader's last problem); None
        when its engine is not loaded here."""
        eng = self._engines.get((version.version, version.digest))
        return None if eng is None else eng.sync

    def sync_once(self) -> dict[str, int]:
        """Catch every loaded engine up with its version's latest published update (off the
        request path: the new weights are built aside, then swapped in between requests)
        -> version -> the seq its engine now stands at. Errors are logged, never raised."""
        with self._lock:
            loaded = [(k[0], e) for k, e in self._engines.items() if e is not None]
        out = {}
        for name, eng in loaded:
            if eng.sync is not None:
                eng.sync.check(eng.engine, eng.lock, name)
                out[name] = eng.sync.seq
        return out

    def start_sync(self, interval_s: float = 1.0) -> None:
        """Run `sync_once` every `interval_s` seconds in a daemon thread until `stop_sync`
        (the server's lifespan). Starting it twice is a no-op."""
        if interval_s <= 0:
            raise ValueError(f"sync interval must be > 0 s, got {interval_s}")
        if self._sync_thread is not None and self._sync_thread.is_alive():
            return
        self._sync_stop.clear()

        def loop() -> None:
            while not self._sync_stop.wait(interval_s):
                t0 = time.perf_counter()
                self.sync_once()
                took = time.perf_counter() - t0
                if took > interval_s:
                    log.info("fm_sync check took %.2f s (interval %.2f s)", took, interval_s)

        self._sync_thread = threading.Thread(target=loop, name="fm-sync", daemon=True)
        self._sync_thread.start()

    def stop_sync(self, timeout_s: float = 10.0) -> None:
        """Stop the background check (waits up to `timeout_s` for a check in progress)."""
        self._sync_stop.set()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=timeout_s)
            self._sync_thread = None

    def clear(self) -> None:
        """Forget loaded engines (and their history caches) and the online histories: the
        next call builds them afresh."""
        with self._lock:
            self._engines.clear()
            self._histories = None
            self._histories_loaded = False
