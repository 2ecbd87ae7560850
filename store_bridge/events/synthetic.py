"""A seeded synthetic event log: multi-surface, multi-task, with one task the FM never sees.

The generative story, chosen so that a long history carries signal beyond the last few events:

* Items have a category, a latent vector (their category's centroid plus noise) and a quality.
* Each user has a long-term interest: weights over a few favourite categories. Now and then a
  favourite is swapped for another category, and the weights move towards the new target by a
  small step per day, so interests drift slowly (weeks, not requests).
* On top of that, users have short bursts: a temporary, strong interest in one random category
  lasting a few requests.
* Each request (one per session-ish visit) happens on a surface at some hour (of the UTC day:
  the spec's time zone is UTC). Its candidates are
  a ranking funnel's mix: items drawn from the user's current interest and uniformly random items.
* Labels are Bernoulli draws from logits that depend on the user's interest . item latent,
  the item quality, the surface and the hour. Engagement deeper than a click (long_view, like,
  share, purchase, follow) is drawn only for clicked impressions. `hide` (negative feedback, the
  task the FM never trains on) is likelier for items far from the user's interest, and a hidden
  impression is never clicked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fm.timefeatures import as_microseconds, hour_of_day, to_us
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, validate_events

SURFACES = ["feed", "search", "notif"]
MAIN_TASKS = ["click", "long_view"]
UNSEEN_TASKS = ["hide"]
SURFACE_TASKS = {
    "feed": ["click", "long_view", "like", "share", "hide"],
    "search": ["click", "long_view", "purchase"],
    "notif": ["click", "long_view", "follow", "hide"],
}
# Bits of the `action` id: the engagement a history token may carry. `hide` is never encoded:
# the FM must not see the unseen task, not even as an input.
ACTION_BITS = {"click": 1, "long_view": 2, "like": 4, "purchase": 4, "follow": 4, "share": 8}
N_ACTIONS = 16

SURFACE_SHARE = np.array([0.6, 0.25, 0.15])  # feed, search, notif: how often each is visited
SURFACE_CLICK_BIAS = np.array([0.0, 0.4, -0.4])  # search intent clicks more, notifs less
SURFACE_INTEREST_GAIN = np.array([1.0, 1.4, 0.8])  # search relevance matters more
SURFACE_RELEVANT_SHARE = np.array([0.5, 0.67, 0.34])  # share of candidates from the interest


_US_PER_SECOND = 1_000_000
_US_PER_DAY = 86_400 * _US_PER_SECOND
_LATENT_DIM = 16


@dataclass
class SyntheticConfig:
    n_users: int = 1000
    n_items: int = 500
    n_categories: int = 20
    days: int = 28
    requests_per_user_per_day: float = 1.5  # Poisson mean
    candidates_per_request: int = 6
    seed: int = 0
    start: str = "2026-01-05"  # UTC date of the first day


def make_spec(cfg: SyntheticConfig) -> DatasetSpec:
    return DatasetSpec(
        name="synthetic",
        surfaces=list(SURFACES),
        main_tasks=list(MAIN_TASKS),
        surface_tasks={s: list(t) for s, t in SURFACE_TASKS.items()},
        unseen_tasks=list(UNSEEN_TASKS),
        n_users=cfg.n_users,
        n_items=cfg.n_items,
        n_categories=cfg.n_categories,
        n_actions=N_ACTIONS,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _group_starts(group: np.ndarray) -> np.ndarray:
    """For an array sorted by group, the index of the first row of each row's group."""
    first = np.ones(len(group), dtype=bool)
    first[1:] = group[1:] != group[:-1]
    return np.maximum.accumulate(np.where(first, np.arange(len(group)), 0))


# ---------------------------------------------------------------- items


@dataclass
class _Items:
    category: np.ndarray  # (n_items,) int64
    latent: np.ndarray  # (n_items, d) float64
    quality: np.ndarray  # (n_items,) float32
    by_category: np.ndarray  # item ids sorted by category
    cat_offset: np.ndarray  # (n_categories,) start of each category in by_category
    cat_count: np.ndarray  # (n_categories,) items per category


def _make_items(cfg: SyntheticConfig, rng: np.random.Generator, centroids: np.ndarray) -> _Items:
    n, k = cfg.n_items, cfg.n_categories
    # Every category gets at least one item, so retrieval from any category always succeeds.
    category = np.concatenate([np.arange(k), rng.integers(0, k, size=n - k)])
    rng.shuffle(category)
    noise = rng.normal(0.0, 0.5 / np.sqrt(_LATENT_DIM), size=(n, _LATENT_DIM))
    latent = centroids[category] + noise
    quality = rng.normal(0.0, 1.0, size=n).astype(np.float32)
    by_category = np.argsort(category, kind="stable")
    cat_count = np.bincount(category, minlength=k)
    cat_offset = np.concatenate([[0], np.cumsum(cat_count)[:-1]])
    return _Items(category.astype(np.int64), latent, quality, by_category, cat_offset, cat_count)


# ---------------------------------------------------------------- users' long-term interests


def _long_term_weights(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_users, days, n_categories) interest weights that drift slowly over days."""
    u, k, days = cfg.n_users, cfg.n_categories, cfg.days
    n_fav = min(3, k)
    strength = np.array([1.5, 1.0, 0.6])[:n_fav]
    # Each user's favourite categories, strongest first.
    favs = np.argsort(rng.random((u, k)), axis=1)[:, :n_fav]
    target = np.zeros((u, k))
    rows = np.arange(u)[:, None]
    target[rows, favs] = strength
    weights = np.empty((u, days, k))
    w = target.copy()  # start at the target: no warm-up period
    swap_prob, step = 0.05, 0.12  # ~1.4 swaps a month; a swap takes ~2 weeks to settle
    for day in range(days):
        weights[:, day] = w
        # A swapped favourite slot takes a new category; the weights then move towards it.
        swap = rng.random(u) < swap_prob
        slot = rng.integers(0, n_fav, size=u)
        new_cat = rng.integers(0, k, size=u)
        for user in np.flatnonzero(swap):
            if target[user, new_cat[user]] == 0:  # only to a category not already a favourite
                target[user, favs[user, slot[user]]] = 0.0
                favs[user, slot[user]] = new_cat[user]
                target[user, new_cat[user]] = strength[slot[user]]
        w = w + step * (target - w)
    return weights


# ---------------------------------------------------------------- requests


@dataclass
class _Requests:
    user: np.ndarray  # (R,) int64, sorted by user then time
    day: np.ndarray  # (R,) int64
    ts_us: np.ndarray  # (R,) int64 microseconds since the start date
    surface: np.ndarray  # (R,) int64 index into SURFACES
    burst_cat: np.ndarray  # (R,) int64, -1 outside a burst


# Diurnal pattern of visits: quiet nights, a lunch bump and an evening peak.
_HOUR_WEIGHT = np.array(
    [2, 1, 1, 1, 1, 1, 2, 4, 5, 5, 5, 6, 8, 7, 5, 5, 5, 6, 8, 10, 11, 10, 7, 4], dtype=float
)


def _make_requests(cfg: SyntheticConfig, rng: np.random.Generator) -> _Requests:
    u, days = cfg.n_users, cfg.days
    counts = rng.poisson(cfg.requests_per_user_per_day, size=(u, days))
    # Rows in (user, day) order; each (user, day) with visits is one session of `n` requests.
    user = np.repeat(np.repeat(np.arange(u), days), counts.ravel())
    day = np.repeat(np.tile(np.arange(days), u), counts.ravel())
    n_req = len(user)
    session = np.repeat(np.arange(u * days), counts.ravel())
    first = _group_starts(session)

    # Requests within a session are 1 s + an exponential gap (mean 10 min) apart.
    gap = _US_PER_SECOND + (rng.exponential(600.0, size=n_req) * _US_PER_SECOND).astype(np.int64)
    gap[first == np.arange(n_req)] = 0
    cum = np.cumsum(gap)
    within = cum - cum[first]  # offset from the session's first request
    span = np.zeros(u * days, dtype=np.int64)
    np.maximum.at(span, session, within)

    hour_p = _HOUR_WEIGHT / _HOUR_WEIGHT.sum()
    start_hour = rng.choice(24, size=u * days, p=hour_p)
    start = start_hour * 3600 * _US_PER_SECOND + rng.integers(0, 3600 * _US_PER_SECOND, u * days)
    # Keep each session inside its day: days never overlap, so a user's times strictly increase.
    start = np.maximum(np.minimum(start, _US_PER_DAY - 1 - span), 0)
    in_day = start[session] + within
    ts_us = day * _US_PER_DAY + in_day

    surface = rng.choice(len(SURFACES), size=n_req, p=SURFACE_SHARE)

    # Bursts: at any request a burst may start; it lasts 2 + Poisson(1.5) requests of that user.
    # The latest start at or before each request decides whether the request is still inside it.
    idx = np.arange(n_req)
    user_first = _group_starts(user)
    starts = rng.random(n_req) < 0.08
    length = 2 + rng.poisson(1.5, size=n_req)
    cat = rng.integers(0, cfg.n_categories, size=n_req)
    last = np.maximum.accumulate(np.where(starts, idx, -1))
    inside = (last >= user_first) & (idx - last < length[np.maximum(last, 0)])
    burst_cat = np.where(inside, cat[np.maximum(last, 0)], -1)

    return _Requests(user, day, ts_us, surface, burst_cat)


# ---------------------------------------------------------------- candidates


def _dedupe_rows(cand: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Replace repeated items within a request by random ones until each row is distinct."""
    for _ in range(100):
        order = np.argsort(cand, axis=1)
        sorted_c = np.take_along_axis(cand, order, axis=1)
        dup_sorted = np.zeros_like(cand, dtype=bool)
        dup_sorted[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
        if not dup_sorted.any():
            return cand
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        cand[dup] = rng.integers(0, n_items, size=int(dup.sum()))
    raise RuntimeError("could not draw distinct candidates")


def _make_candidates(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    req: _Requests,
    weights: np.ndarray,
    items: _Items,
) -> np.ndarray:
    """(R, M) item ids: the first slots from the user's current interest, the rest random."""
    m, k = cfg.candidates_per_request, cfg.n_categories
    n_req = len(req.user)
    # Retrieval knows the user's current interest (long-term plus burst) but is not sharp.
    score = weights[req.user, req.day].copy()
    bursting = req.burst_cat >= 0
    score[np.flatnonzero(bursting), req.burst_cat[bursting]] += 2.0
    p = np.exp(1.5 * score)
    cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    draws = rng.random((n_req, m))
    cats = np.minimum((draws[:, :, None] > cdf[:, None, :]).sum(axis=2), k - 1)
    pick = (rng.random((n_req, m)) * items.cat_count[cats]).astype(np.int64)
    relevant = items.by_category[items.cat_offset[cats] + pick]
    random_items = rng.integers(0, cfg.n_items, size=(n_req, m))
    n_rel = np.rint(SURFACE_RELEVANT_SHARE[req.surface] * m).astype(np.int64)
    cand = np.where(np.arange(m)[None, :] < n_rel[:, None], relevant, random_items)
    cand = _dedupe_rows(cand, cfg.n_items, rng)
    # Shuffle slots so a candidate's position says nothing about where it came from.
    return np.take_along_axis(cand, np.argsort(rng.random((n_req, m)), axis=1), axis=1)


# ---------------------------------------------------------------- labels


def _make_labels(
    rng: np.random.Generator,
    surface: np.ndarray,
    hour: np.ndarray,
    affinity: np.ndarray,
    quality: np.ndarray,
    item_latent: np.ndarray,
) -> dict[str, np.ndarray]:
    """One float32 array per task, NaN where the task does not apply on the row's surface."""
    n = len(surface)
    angle = 2 * np.pi * hour / 24.0
    # Evenings engage more; some items (latent dim 0/1) suit night or day better.
    hour_effect = 0.3 * np.cos(2 * np.pi * (hour - 20) / 24.0) + 0.4 * (
        item_latent[:, 0] * np.cos(angle) + item_latent[:, 1] * np.sin(angle)
    )
    click_logit = (
        -2.6
        + 1.2 * SURFACE_INTEREST_GAIN[surface] * affinity
        + 0.4 * quality
        + SURFACE_CLICK_BIAS[surface]
        + hour_effect
    )
    click = rng.random(n) < _sigmoid(click_logit)
    # Hides come from low interest and poor quality; a hidden impression is never clicked.
    hide = rng.random(n) < _sigmoid(-3.0 - 1.2 * affinity - 0.4 * quality)
    click &= ~hide

    def given_click(logit: np.ndarray) -> np.ndarray:
        return click & (rng.random(n) < _sigmoid(logit))

    raw = {
        "click": click,
        "long_view": given_click(-1.6 + 0.9 * quality + 0.5 * affinity),
        "like": given_click(-3.0 + 0.7 * affinity + 0.5 * quality),
        "share": given_click(-4.0 + 0.6 * affinity + 0.8 * quality),
        "purchase": given_click(-3.2 + 1.0 * quality + 0.5 * affinity),
        "follow": given_click(-1.6 + 0.9 * affinity),
        "hide": hide,
    }
    labels: dict[str, np.ndarray] = {}
    for task, values in raw.items():
        valid = np.isin(surface, [i for i, s in enumerate(SURFACES) if task in SURFACE_TASKS[s]])
        labels[task] = np.where(valid, values.astype(np.float32), np.float32(np.nan))
    return labels


def action_ids(events: pd.DataFrame) -> np.ndarray:
    """The int16 bitmask of the engagement labels a history token may carry (NaN counts as 0)."""
    action = np.zeros(len(events), dtype=np.int16)
    for task, bit in ACTION_BITS.items():
        if task in events.columns:
            on = events[task].to_numpy(dtype=np.float32) == 1.0  # NaN compares False
            action |= np.where(on, bit, 0).astype(np.int16)
    return action


# ---------------------------------------------------------------- public API


def generate(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """Build (events, items, spec); deterministic for a given config (seed included)."""
    if cfg.n_items < max(cfg.candidates_per_request, cfg.n_categories):
        raise ValueError("n_items must be >= candidates_per_request and n_categories")
    rng = np.random.default_rng(cfg.seed)
    spec = make_spec(cfg)
    start = pd.Timestamp(cfg.start, tz="UTC")

    centroids = rng.normal(size=(cfg.n_categories, _LATENT_DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    items = _make_items(cfg, rng, centroids)
    weights = _long_term_weights(cfg, rng)
    req = _make_requests(cfg, rng)
    cand = _make_candidates(cfg, rng, req, weights, items)
    m = cfg.candidates_per_request

    # A user's interest vector at each request: long-term categories, a small personal taste
    # off the category structure, and the burst category if one is running.
    personal = rng.normal(0.0, 0.4 / np.sqrt(_LATENT_DIM), size=(cfg.n_users, _LATENT_DIM))
    interest = weights[req.user, req.day] @ centroids + personal[req.user]
    bursting = req.burst_cat >= 0
    interest[bursting] += 2.0 * centroids[req.burst_cat[bursting]]

    # The hour of day (UTC, the spec's time zone) of each request, from its absolute time,
    # derived the one way the FM derives it; the labels' diurnal effect reads the same hour.
    req_hour = hour_of_day(to_us(start) + req.ts_us, spec.time_zone)

    # Impressions, in request order.
    r_idx = np.repeat(np.arange(len(req.user)), m)
    item = cand.ravel()
    affinity = np.einsum("nd,nd->n", interest[r_idx], items.latent[item])
    labels = _make_labels(
        rng,
        req.surface[r_idx],
        req_hour[r_idx].astype(np.float64),
        affinity,
        items.quality[item].astype(np.float64),
        items.latent[item],
    )

    # request_id follows global time order (ties between users broken by user), so sorting
    # by (event_timestamp, request_id) is the same as sorting by request_id.
    time_order = np.lexsort((req.user, req.ts_us))
    request_id = np.empty(len(req.user), dtype=np.int64)
    request_id[time_order] = np.arange(len(req.user))

    ts = pd.Series(start + pd.to_timedelta(req.ts_us[r_idx], unit="us"))
    events = pd.DataFrame(
        {
            "request_id": request_id[r_idx],
            "user_id": req.user[r_idx].astype(np.int64),
            "item_id": item.astype(np.int64),
            EVENT_TIMESTAMP: as_microseconds(ts),
            "surface": np.array(SURFACES, dtype=object)[req.surface[r_idx]],
            "hour": req_hour[r_idx].astype(np.int8),
            "action": np.zeros(len(r_idx), dtype=np.int16),
            **{task: labels[task] for task in spec.all_tasks},
        }
    )
    events["action"] = action_ids(events)
    events = events.sort_values("request_id", kind="stable").reset_index(drop=True)

    items_df = pd.DataFrame(
        {
            "item_id": np.arange(cfg.n_items, dtype=np.int64),
            "category": items.category,
            "quality": items.quality,
            EVENT_TIMESTAMP: as_microseconds(pd.Series([start] * cfg.n_items)),
        }
    )
    validate_events(events, spec)
    return events, items_df, spec
