"""Lookup and score: a version's TAEs read from the online store, missing rows computed by the
FM tier (read-through) and written back, and an expert's scores over them.

Stale rows: a stored TAE was computed as of its event time (a logged request, an earlier
write-back) and sees none of the user's events from then on. When read-through can compute
(on, the version active, its FM loadable), a stored row whose event time is not after the
user's newest event in the online histories (before the request time) is stale: read-through
computes it again as of the request time and writes it back (the store's compare-and-set keeps
the newer row), so a TAE served after an event reflects it. A stale row read-through cannot
compute (an item outside the FM's vocabulary, the FM failing) is served as stored: an older TAE
is better than none. A late event (older than rows stored after it arrived) is not seen this
way: only event times are compared.

What happened on the way (rows unusable, read-through skipped, a failed write-back,
impressions that could not be logged) is returned in `LookupStats`; the REST face turns it
into metrics.

Served impressions: when `settings.log_served_impressions` is on, every lookup and score
hands its candidates (user, item, request time, surface) to the context's impression buffer,
which appends them to the impressions stream in the background, one record batch per flush,
for the logging consumer (`store_bridge.streams.impressions`). The request time is taken once,
when the request starts: read-through computes with it and the impressions carry it. A full
stream or a Redis error never fails the request: the buffer keeps the rows and retries, and
what it cannot hold is counted in `LookupStats.impressions_not_logged`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from api.services.context import ServiceContext, as_int_array
from api.services.errors import Conflict, Invalid, StoreUnavailable
from experts import ExpertConfig, predict
from fm.timefeatures import to_us
from store_bridge.online import EmbeddingRows, NewestEvent
from store_bridge.repo import FMVersion

log = logging.getLogger("foundex.api")

F16_MAX = float(np.finfo(np.float16).max)  # 65504: beyond it a value would become inf in f16
WARN_EVERY_S = 10.0  # impressions-not-logged warnings: at most one line this often


@dataclass
class LookupStats:
    """Counts for the metrics: rows by source, unusable rows by reason, read-through skips by
    reason, stale rows by outcome ("recomputed": served computed now; "served": as stored,
    read-through could not compute them), failed write-backs, and served impressions not
    appended to the impressions stream (one per candidate)."""

    stored: int = 0
    computed: int = 0
    missing: int = 0
    unusable: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    stale: Counter = field(default_factory=Counter)
    write_errors: int = 0
    impressions_not_logged: int = 0


@dataclass
class Embeddings:
    """One version's TAEs of the candidates: `matrix` float32 [n, dim] (missing rows NaN),
    `missing` and `computed` ascending, disjoint indices into the candidates; `surface` the
    one the lookup resolved (named by the request or the expert, else the FM's first as
    read-through chose it; None when neither named one and read-through did not run)."""

    version: FMVersion
    matrix: np.ndarray
    missing: list[int]
    computed: list[int]  # stale rows computed again included
    stats: LookupStats
    surface: str | None = None


@dataclass
class Scores:
    """An expert's scores: `scores` float [n, n_tasks]; indices scored without a TAE
    (`missing`) and with one computed now (`computed`); `stats` the lookup's counts (for an
    expert without FM embeddings nothing was looked up: only `impressions_not_logged` can be
    non-zero)."""

    expert: ExpertConfig
    scores: np.ndarray
    missing: list[int]
    computed: list[int]
    stats: LookupStats | None


def check_size(ctx: ServiceContext, item_ids: list[int]) -> None:
    """Invalid when there are more candidates than settings.max_candidates."""
    if len(item_ids) > ctx.settings.max_candidates:
        raise Invalid(
            f"item_ids has {len(item_ids)} entries; at most {ctx.settings.max_candidates}"
        )


def lookup(
    ctx: ServiceContext,
    user_id: int,
    item_ids: list[int],
    *,
    fm_version: str | None = None,
    expert: str | None = None,
    surface: str | None = None,
    limit: float = math.inf,
) -> Embeddings:
    """The TAEs of one version (named, or the one `expert` pins) for a user's candidates.

    The surface for read-through is the one given, else the expert's, else the FM's first
    (the last chosen in `_read_through`, the only place that knows the FM's surfaces). Rows
    beyond +-limit (F16_MAX for a float16 answer) are reported missing. Stored rows older than
    the user's newest event are computed again where read-through can, else served as stored
    (the module docstring). Raises NotFound (unknown version/expert), Conflict (an expert pins a
    version the manifest lacks), Invalid (too many candidates, an expert without FM, a
    surface the FM lacks), StoreUnavailable.
    """
    check_size(ctx, item_ids)
    now_us = to_us(datetime.now(UTC))  # the request time: computed with, and logged with
    if expert is not None:
        cfg = ctx.expert(expert)
        if cfg.fm_version is None:
            raise Invalid(f"expert {cfg.name!r} uses no FM embeddings")
        version = ctx.pinned_version(cfg)
        surface = surface or cfg.surface
    else:
        version = ctx.version(fm_version or "")
    items = as_int_array(item_ids)
    found = embeddings(ctx, version, user_id, items, surface, limit=limit, now_us=now_us)
    log_served(ctx, found.stats, user_id, items, now_us, found.surface,
               fm_version=version.version, expert=expert)
    return found


def unservable(matrix: np.ndarray, missing: list[int], limit: float) -> list[int]:
    """Rows outside `missing` that hold a non-finite value or one beyond +-limit, ascending."""
    if math.isinf(limit):
        fine = np.isfinite(matrix).all(axis=1)
    else:  # NaN and Inf fail a finite bound too
        fine = (np.abs(matrix) <= limit).all(axis=1)
    fine[missing] = True
    return np.flatnonzero(~fine).tolist()


def embeddings(
    ctx: ServiceContext,
    version: FMVersion,
    user_id: int,
    items: np.ndarray,
    surface: str | None,
    *,
    rows: EmbeddingRows | None = None,
    surface_from_request: bool = True,
    limit: float = math.inf,
    now_us: int | None = None,
) -> Embeddings:
    """One version's TAEs of `items` (int64 [n]) for a user; read-through computes them as of
    `now_us` (the request time, µs since the epoch; default: now).

    Stored rows first (`rows`, when the caller read them already with `stored_rows`). Rows the
    store could not decode or that hold NaN/Inf count as missing, so read-through computes them
    again and its write-back replaces them; stale rows (`stored_rows`) are computed again too,
    and served as stored where read-through cannot. Whatever their source, rows holding a
    non-finite value or one beyond +-limit are never served: reported missing. Raises
    StoreUnavailable, and Invalid for a requested surface the FM lacks.
    """
    stats = LookupStats()
    now_us = to_us(datetime.now(UTC)) if now_us is None else now_us
    if rows is None:
        rows = stored_rows(ctx, version, user_id, items, now_us)
    matrix, missing, stale = rows.matrix, list(rows.missing), rows.stale
    if rows.undecodable:
        stats.unusable["undecodable"] += len(rows.undecodable)
    bad = unservable(matrix, missing, math.inf)  # the store reports these already: a guard
    if bad:
        stats.unusable["non_finite"] += len(bad)
        matrix[bad] = np.nan
        missing = sorted({*missing, *bad})
        stale = sorted(set(stale) - set(bad))
    computed: list[int] = []
    if (missing or stale) and ctx.settings.read_through and version.status == "active":
        matrix, missing, computed, surface = _read_through(
            ctx, stats, version, user_id, items, matrix, missing, stale, surface,
            surface_from_request=surface_from_request, now_us=now_us,
        )
    bad = unservable(matrix, missing, limit)
    if bad:
        n_finite = int(np.isfinite(matrix[bad]).all(axis=1).sum())
        stats.unusable["f16_range"] += n_finite
        stats.unusable["non_finite"] += len(bad) - n_finite
        matrix[bad] = np.nan
        missing = sorted({*missing, *bad})
        dropped = set(bad)
        computed = [i for i in computed if i not in dropped]
    if stale:  # (adding Counters keeps only positive counts)
        again = set(stale).intersection(computed)
        stats.stale += Counter(recomputed=len(again),
                               served=len(set(stale).difference(again, missing)))
    stats.stored = len(items) - len(missing) - len(computed)
    stats.computed, stats.missing = len(computed), len(missing)
    return Embeddings(version, matrix, missing, computed, stats, surface)


def stored_rows(
    ctx: ServiceContext, version: FMVersion, user_id: int, items: np.ndarray, now_us: int
) -> EmbeddingRows:
    """The version's stored rows of `items` (int64 [n]) for a user. When read-through could
    compute them again, rows stored at or before the user's newest event before `now_us` (µs)
    in the online histories are reported in `stale`: the store looks the event up and
    compares in the same script as the read. Raises StoreUnavailable."""
    newer_than = None
    if _can_recompute(ctx, version):
        newer_than = NewestEvent(ctx.histories.key(user_id), before_us=now_us)
    return ctx.store.read(version.version, version.dim, user_id, items, newer_than=newer_than)


def _can_recompute(ctx: ServiceContext, version: FMVersion) -> bool:
    """Whether read-through could compute the version's rows: on, the version active, its FM
    loadable here (loaded on first use) over online histories."""
    if not (ctx.settings.read_through and ctx.settings.refresh_stale
            and version.status == "active"):  # fmt: skip
        return False
    try:
        return ctx.fm_tier.surfaces(version) is not None
    except Exception:  # as in _read_through: the stored rows are served unchecked
        log.exception("read-through unavailable", extra={"fields": {"fm_version": version.version}})
        return False


def _read_through(
    ctx: ServiceContext, stats: LookupStats, version: FMVersion, user_id: int,
    items: np.ndarray, matrix: np.ndarray, missing: list[int], stale: list[int],
    surface: str | None, *, surface_from_request: bool = True, now_us: int,
) -> tuple[np.ndarray, list[int], list[int], str | None]:
    """Compute the missing and stale rows with the same FM version as of `now_us`, write them
    back, fill them in -> (matrix, missing, computed, the surface used: the FM's first when
    `surface` is None and the FM's surfaces are known). A stale row not computed keeps its
    stored value.

    Only for users with history in the FM tier's event log: an unknown user's rows stay
    missing and nothing is written, so requests cannot fill the online store with rows for
    arbitrary ids (skipped "unknown_user"). Candidates outside the FM's vocabulary stay
    missing too ("unknown_item").

    A surface the FM does not know is the caller's error (Invalid) when the request named it;
    when it is an expert's own surface, the stored rows are served as they are."""
    nothing: tuple[np.ndarray, list[int], list[int], str | None] = (matrix, missing, [], surface)
    try:
        known = ctx.fm_tier.surfaces(version)  # loads the version's engine on first use
    except Exception:  # an unreadable event log or checkpoint: serve what is stored
        log.exception("read-through unavailable", extra={"fields": {"fm_version": version.version}})
        return nothing
    if known is None:
        return nothing
    if surface is None:
        surface = known[0]  # neither the request nor an expert named one: the FM's first
        nothing = (matrix, missing, [], surface)
    elif surface not in known:
        if not surface_from_request:
            return nothing
        raise Invalid(f"unknown surface {surface!r}; FM {version.version} knows {known}")
    holes = np.asarray(sorted({*missing, *stale}), dtype=np.int64)
    try:
        result = ctx.fm_tier.compute(version, user_id, items[holes], surface, now_us)
    except Exception:  # the FM tier is an optimisation: stored rows are still served
        log.exception("read-through failed", extra={"fields": {"fm_version": version.version}})
        return nothing
    if result is None:
        return nothing
    if result.unknown_user:  # its history expired since the stale check
        stats.skipped["unknown_user"] += len(missing)
        return nothing
    done = holes[result.positions]
    if result.unknown_items:
        # The count covers every hole; skips count missing rows only, so the stale rows left
        # uncomputed (served as stored) are taken off. Exact unless one came out non-finite.
        stale_left = len(stale) - int(np.isin(done, stale).sum())
        stats.skipped["unknown_item"] += max(0, result.unknown_items - stale_left)
    if len(done) == 0:
        return nothing
    matrix = matrix.copy()
    matrix[done] = result.taes
    ts = np.full(len(done), now_us, dtype=np.int64)
    try:
        ctx.store.write(version.version, np.full(len(done), user_id), items[done], ts, result.taes)
    except StoreUnavailable as e:
        stats.write_errors += 1  # still served; the next request computes again
        log.warning("write-back failed", extra={"fields": {"error": str(e)}})
    computed = sorted(int(i) for i in done)
    left = sorted(set(missing) - set(computed))
    return matrix, left, computed, surface


def log_served(
    ctx: ServiceContext, stats: LookupStats, user_id: int, items: np.ndarray, now_us: int,
    surface: str | None, *, fm_version: str | None, expert: str | None,
) -> None:  # fmt: skip
    """Hand a request's served impressions (`items`, int64 [n]) to the context's impression
    buffer, which appends them to the impressions stream in the background
    (`store_bridge.streams.impression_buffer`). `surface`: the one the request resolved;
    None -> the dataset spec's first, which is every loadable FM version's first (`load_engine`
    refuses another order), so no FM is loaded for it.

    Never raises: impressions the buffer refuses (full: the stream has not taken appends for
    a while) or that cannot be described (a repo without a dataset spec) are counted in
    `stats.impressions_not_logged`."""
    if not ctx.settings.log_served_impressions or len(items) == 0:
        return
    try:
        if surface is None:
            surface = ctx.histories.surfaces[0]
    except Conflict as e:
        stats.impressions_not_logged += len(np.unique(items))
        _warn_unlogged(str(e))
        return
    if not ctx.impression_buffer.submit(
        user_id, items, now_us, surface, fm_version=fm_version, expert=expert
    ):
        stats.impressions_not_logged += len(np.unique(items))


_warned_at = [-math.inf]


def _warn_unlogged(error: str) -> None:
    """One warning line per WARN_EVERY_S at most."""
    if time.monotonic() - _warned_at[0] >= WARN_EVERY_S:
        _warned_at[0] = time.monotonic()
        log.warning("impressions not logged", extra={"fields": {"error": error}})


def score(ctx: ServiceContext, name: str, user_id: int, item_ids: list[int]) -> Scores:
    """An expert's task probabilities for a user's candidates, with the pinned version's TAEs
    (read-through as in a lookup, on the expert's own surface) and its Feast features.

    Raises NotFound, Conflict, Invalid (too many candidates), StoreUnavailable."""
    check_size(ctx, item_ids)
    now_us = to_us(datetime.now(UTC))  # the request time: computed with, and logged with
    cfg = ctx.expert(name)
    version = ctx.pinned_version(cfg) if cfg.fm_version is not None else None
    model = ctx.expert_model(cfg)  # loads from disk on first use
    items = as_int_array(item_ids)
    # The pinned version's TAEs and the expert's Feast features are fetched concurrently.
    taes = None
    if version is not None:
        taes = ctx.fetchers.submit(stored_rows, ctx, version, user_id, items, now_us)
    try:
        feats = ctx.online_features(cfg, user_id, item_ids)
    finally:
        rows = taes.result() if taes is not None else None
    frame = pd.DataFrame({"user_id": user_id, "item_id": items})
    for f in cfg.item_features:
        frame[f] = [np.nan if v is None else v for v in feats[f]]
    k = cfg.history_length
    frame["recent_items"] = [_last_k(feats["recent_items"][0] or [], k)] * len(items)
    frame["recent_actions"] = [_last_k(feats["recent_actions"][0] or [], k)] * len(items)
    if rows is None or version is None:  # the no-FM baseline
        probs = np.asarray(predict(model, frame), dtype=float)
        stats = LookupStats()
        log_served(ctx, stats, user_id, items, now_us, cfg.surface, fm_version=None,
                   expert=cfg.name)
        return Scores(cfg, probs, [], [], stats)
    # The same rules and read-through as a lookup: the expert scores with the TAE it was
    # trained on rather than without one.
    found = embeddings(ctx, version, user_id, items, cfg.surface, rows=rows,
                       surface_from_request=False, now_us=now_us)
    gone = set(found.missing)
    frame["embedding"] = [None if i in gone else r for i, r in enumerate(found.matrix)]
    probs = np.asarray(predict(model, frame), dtype=float)
    log_served(ctx, found.stats, user_id, items, now_us, found.surface,
               fm_version=version.version, expert=cfg.name)
    return Scores(cfg, probs, found.missing, found.computed, found.stats)


def _last_k(values: list[int], k: int) -> np.ndarray:
    """Right-aligned last k entries, 0-padded on the left (the experts' history format)."""
    out = np.zeros(k, dtype=np.int64)
    tail = np.asarray(values[-k:], dtype=np.int64)
    if len(tail):
        out[k - len(tail) :] = tail
    return out
