"""Target-aware inference: TAEs for (user, request time, surface, candidate) rows.

The request time (int64 microseconds, UTC) is the only time input: the history is cut
strictly before it and the hour of day is derived from it in the model's time zone
(`fm.timefeatures`). Candidates outside the model's item vocabulary are not embedded (NaN
rows; `TAEEngine.known_items` says which); unknown items in a history read the OOV row.

Rows are grouped by (user, request time, surface). Each group's history is encoded once
(per-layer K/V), then all its candidates attend to that cached history plus themselves, so M
candidates cost about one forward pass, not M. Many groups share one forward.

Across requests, an optional `HistoryCache` keeps each user's encoded history (per-layer K/V)
and reuses it while the user's history as of the request time is unchanged. The encoded history
is a function of the history events alone (positions are relative to the last event), so a hit
gives the same TAEs as encoding again. The check is a fingerprint of the history as of the
request: (events of the user strictly before it, kept length, time of the last event). When the
user's history grows, the fingerprint changes and the entry is replaced. This assumes an
append-only event log (events are added, never rewritten).

A store that may change a history without changing its fingerprint (a capped history drops its
oldest event as a late one arrives) keeps a per-user version counter instead, and passes it
with the histories (`compute(..., histories=, versions=)`): an entry recorded under another
version is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from fm.batching import Batch, collate
from fm.history import UserHistories, surface_codes
from fm.model import FoundationModel, HistoryState

Fingerprint = tuple[int, int, int]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    invalidations: int = 0  # entries replaced because the user's history changed
    evictions: int = 0  # entries dropped to stay within max_bytes


@dataclass
class _Entry:
    fingerprint: Fingerprint
    kv: list[tuple[Tensor, Tensor]]  # per layer: k, v [H, n, dh], n = the history's length
    nbytes: int
    version: int | None = None  # the caller's history version it was encoded from, if any


class HistoryCache:
    """Per-user encoded histories (per-layer K/V), LRU within a byte budget.

    One entry per user: the newest history seen for them. `get` returns it only when the
    fingerprint (and the history version, where the caller keeps one) matches; a request with
    a grown history, or another version of it, drops it (and refills it).
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.nbytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: int) -> bool:
        return int(user_id) in self._entries

    def fingerprint(self, user_id: int) -> Fingerprint | None:
        e = self._entries.get(int(user_id))
        return None if e is None else e.fingerprint

    def get(
        self, user_id: int, fingerprint: Fingerprint, version: int | None = None
    ) -> list[tuple[Tensor, Tensor]] | None:
        """The user's cached K/V if it encodes exactly this history, else None.

        A request whose history is newer than the entry (the history grew, or the log was
        rewritten) drops the entry; an older one (a backfill) misses and leaves it be.
        `version`: the caller's version of the user's history (None: it keeps none); an
        entry recorded under another version is dropped whatever the fingerprint says.
        """
        user_id = int(user_id)
        e = self._entries.get(user_id)
        if e is not None and e.version == version and e.fingerprint == fingerprint:
            self._entries.move_to_end(user_id)
            self.stats.hits += 1
            return e.kv
        self.stats.misses += 1
        if e is not None and (e.version != version or fingerprint[0] >= e.fingerprint[0]):
            self._drop(user_id)
            self.stats.invalidations += 1
        return None

    def put(
        self, user_id: int, fingerprint: Fingerprint, kv: list[tuple[Tensor, Tensor]],
        version: int | None = None,
    ) -> None:  # fmt: skip
        """Keep the user's newest history: an older one of the same version never replaces
        a newer entry; one of another version always does."""
        user_id = int(user_id)
        e = self._entries.get(user_id)
        if e is not None:
            if e.version == version and e.fingerprint[0] > fingerprint[0]:
                return
            self._drop(user_id)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        self._entries[user_id] = _Entry(fingerprint, kv, nbytes, version)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            old = next(iter(self._entries))
            self._drop(old)
            self.stats.evictions += 1

    def invalidate(self, user_id: int | None = None) -> None:
        """Forget one user (or everyone)."""
        if user_id is None:
            self._entries.clear()
            self.nbytes = 0
        elif int(user_id) in self._entries:
            self._drop(int(user_id))

    def _drop(self, user_id: int) -> None:
        self.nbytes -= self._entries.pop(user_id).nbytes


def history_fingerprints(
    histories: UserHistories, user_ids: np.ndarray, ts_us: np.ndarray, max_len: int
) -> np.ndarray:
    """int64 [Q, 3]: (user's events strictly before ts, kept length, last event time or -1)."""
    end, length = histories.lookup(user_ids, ts_us, max_len)
    out = np.full((len(end), 3), -1, dtype=np.int64)
    if len(histories.users) == 0 or len(end) == 0:
        out[:, :2] = 0
        return out
    u = np.searchsorted(histories.users, user_ids)
    known = (u < len(histories.users)) & (
        histories.users[np.minimum(u, len(histories.users) - 1)] == user_ids
    )
    start = histories.offsets[np.where(known, u, 0)]
    out[:, 0] = np.where(known, end - start, 0)
    out[:, 1] = length
    has = length > 0
    out[:, 2] = np.where(has, histories.ts_us[np.maximum(end - 1, 0)], -1)
    return out


def _select(batch: Batch, idx: Tensor) -> Batch:
    """Rows idx of a batch, history trimmed to their longest."""
    n = int(batch.hist_len[idx].max()) if len(idx) else 0
    parts = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if v is None:
            parts[f.name] = None
            continue
        v = v[idx]
        if f.name.startswith("hist_") and f.name != "hist_len":
            v = v[:, :n]
        parts[f.name] = v
    return Batch(**parts)


class TAEEngine:
    def __init__(
        self,
        model: FoundationModel,
        histories: UserHistories | None,
        device: str | torch.device = "cpu",
        *,
        max_groups: int = 512,  # requests per forward
        max_rows: int = 16384,  # candidates per forward (bounds padding memory)
        history_cache: HistoryCache | bool | None = None,
    ) -> None:
        """histories: the events every call reads unless it passes its own (None: each call
        must); history_cache: True (a fresh `HistoryCache`), or one to share; None/False: none."""
        self.model = model.to(device).eval()
        self.config = model.config
        self.histories = histories
        self.device = torch.device(device)
        self.max_groups, self.max_rows = max_groups, max_rows
        if history_cache is True:
            history_cache = HistoryCache()
        # (an empty HistoryCache is falsy through __len__: compare with None, not truthiness)
        self.cache: HistoryCache | None = None if history_cache in (None, False) else history_cache

    def set_histories(self, histories: UserHistories) -> None:
        """Swap in a newer event log. Cached users whose history as of a later request is
        unchanged stay valid (fingerprints compare history, not row positions)."""
        self.histories = histories

    @property
    def dim(self) -> int:
        return self.config.d_model

    @property
    def n_items(self) -> int:
        """Size of the model's item vocabulary: ids in [0, n_items) are known."""
        return self.config.n_items

    def known_items(self, item_ids: np.ndarray) -> np.ndarray:
        """bool [n]: True where the id is in the model's vocabulary [0, n_items) (0 is an
        item). Unknown ids (negative, or newer than the model) are not embedded as
        candidates by `compute`; in a history they read the model's OOV row."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        return (item_ids >= 0) & (item_ids < self.config.n_items)

    @torch.no_grad()
    def compute(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        ts_us: np.ndarray,
        surfaces: np.ndarray,
        *,
        histories: UserHistories | None = None,
        versions: Mapping[int, int] | None = None,
    ) -> np.ndarray:
        """One TAE per input row -> float32 [n, d], in the input row order.

        user_ids, item_ids: [n] int64; ts_us: [n] int64 microseconds since the epoch (UTC):
        the request time, which both cuts the history (events strictly before it) and gives
        the hour of day, in config.time_zone (callers pass no hour, so none can disagree);
        surfaces: [n] names from config.surfaces (ValueError otherwise).
        A row whose candidate is outside the vocabulary (`known_items` False) is not
        embedded: its row is all NaN. Callers skip or report those rows.

        histories: this call's events (else the engine's own; ValueError when neither). The
        engine keeps nothing of them but cache entries, so threads that serialise their
        calls may each pass their own. versions: user -> the version of that user's history
        in `histories` (any int that changes whenever it does); a cache entry recorded under
        another version is not used. Users missing from it are cached by fingerprint alone.
        """
        histories = self.histories if histories is None else histories
        if histories is None:
            raise ValueError("TAEEngine has no histories of its own: pass histories=")
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        ts_us = np.asarray(ts_us, dtype=np.int64).reshape(-1)
        surf = surface_codes(np.asarray(surfaces, dtype=object).reshape(-1), self.config.surfaces)
        n = len(user_ids)
        if not (len(item_ids) == len(ts_us) == len(surf) == n):
            raise ValueError(
                f"compute needs one user, item, time and surface per row, got lengths "
                f"{n}, {len(item_ids)}, {len(ts_us)}, {len(surf)}"
            )
        known = self.known_items(item_ids)
        if known.all():
            return self._compute(histories, versions, user_ids, item_ids, ts_us, surf)
        out = np.full((n, self.dim), np.nan, dtype=np.float32)
        if known.any():
            out[known] = self._compute(
                histories, versions, user_ids[known], item_ids[known], ts_us[known], surf[known]
            )
        return out

    def _compute(
        self, histories: UserHistories, versions: Mapping[int, int] | None,
        user_ids: np.ndarray, item_ids: np.ndarray, ts_us: np.ndarray, surf: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """`compute` over rows whose candidates are all known; surf: codes -> float32 [n, d]."""
        n = len(user_ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out

        order = np.lexsort((surf, ts_us, user_ids))  # rows of one group become contiguous
        u, t, s = user_ids[order], ts_us[order], surf[order]
        new = np.r_[True, (u[1:] != u[:-1]) | (t[1:] != t[:-1]) | (s[1:] != s[:-1])]
        starts = np.flatnonzero(new)
        offsets = np.append(starts, n)  # [G + 1] into `order`
        n_groups = len(starts)

        g0 = 0
        while g0 < n_groups:
            g1 = min(n_groups, g0 + self.max_groups)
            fits = np.searchsorted(offsets, offsets[g0] + self.max_rows, side="right") - 1
            g1 = max(g0 + 1, min(g1, int(fits)))
            a, b = offsets[g0], offsets[g1]
            rows = order[a:b]
            batch = collate(
                histories,
                self.config,
                u[starts[g0:g1]],
                t[starts[g0:g1]],
                offsets[g0 : g1 + 1] - a,
                item_ids[rows],
                surf[rows],
            ).to(self.device)
            users, times = u[starts[g0:g1]], t[starts[g0:g1]]
            state = self._history_state(histories, versions, batch, users, times)
            tae = self.model.encode_targets(batch, state)  # [G, M, d]
            # tgt_mask is row-major over (group, candidate): same order as `rows`
            out[rows] = tae[batch.tgt_mask].float().cpu().numpy()
            g0 = g1
        return out

    def _history_state(
        self, histories: UserHistories, versions: Mapping[int, int] | None, batch: Batch,
        users: np.ndarray, times: np.ndarray,
    ) -> HistoryState:  # fmt: skip
        """Each group's encoded history (once per group), from the cache where it holds it."""
        if self.cache is None:
            return self.model.encode_history(batch)
        fps = history_fingerprints(histories, users, times, self.config.max_history)
        keys = [tuple(int(x) for x in fp) for fp in fps]
        vers = [None if versions is None else versions.get(int(us)) for us in users]
        kv_rows = [
            self.cache.get(int(us), fp, ver) for us, fp, ver in zip(users, keys, vers, strict=True)
        ]
        miss = [i for i, kv in enumerate(kv_rows) if kv is None]
        fresh = None
        if miss:
            sub = _select(batch, torch.as_tensor(miss, device=batch.hist_len.device))
            fresh = self.model.encode_history(sub)
            for j, i in enumerate(miss):
                n = int(sub.hist_len[j])
                kv = [(k[j, :, :n].clone(), v[j, :, :n].clone()) for k, v in fresh.kv]
                self.cache.put(int(users[i]), keys[i], kv, vers[i])
                kv_rows[i] = kv
            if len(miss) == len(users):  # nothing reused: the fresh state is the batch's
                return fresh
        # Pad the per-user K/V back into one [G, H, N, dh] tensor per layer.
        n_hist = batch.n_hist
        kv_layers = []
        for layer in range(len(self.model.layers)):
            k0, _ = kv_rows[0][layer]
            H, dh = k0.shape[0], k0.shape[-1]
            shape = (len(users), H, n_hist, dh)
            K = torch.zeros(shape, dtype=k0.dtype, device=k0.device)
            V = torch.zeros(shape, dtype=k0.dtype, device=k0.device)
            for i, kv in enumerate(kv_rows):
                k, v = kv[layer]
                K[i, :, : k.shape[1]] = k
                V[i, :, : v.shape[1]] = v
            kv_layers.append((K, V))
        return HistoryState(kv=kv_layers, hist_len=batch.hist_len)

    def compute_request(
        self, user_id: int, ts_us: int, surface: str, item_ids: np.ndarray, *,
        histories: UserHistories | None = None, history_version: int | None = None,
    ) -> np.ndarray:  # fmt: skip
        """TAEs of one request's candidates -> float32 [M, d] (NaN rows for candidates
        outside the vocabulary, as in `compute`). ts_us: the request time, int microseconds
        since the epoch (UTC); the hour of day comes from it. histories, history_version:
        this call's events and the version of the user's history in them (see `compute`)."""
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        m = len(item_ids)
        versions = None if history_version is None else {int(user_id): int(history_version)}
        return self.compute(
            np.full(m, user_id, dtype=np.int64),
            item_ids,
            np.full(m, ts_us, dtype=np.int64),
            np.full(m, surface, dtype=object),
            histories=histories,
            versions=versions,
        )
