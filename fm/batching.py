"""Request-shaped batches: (user, request time, history before it, M candidates, labels).

`Requests` groups an event log into time-ordered requests; `collate` turns any set of
(user, time, ragged candidates) into padded tensors. Training, evaluation and the inference
engine all go through `collate`, so the features a TAE is computed from are built one way.

History tokens carry position features relative to the history's own last event (recency rank,
time gap to the last event), so the encoded history is a function of the history alone and can
be cached across requests; the request's own time reaches the model through the targets
(gap between request time and the last history event, and the hour of the request).

Hours of day are derived here, from each event's and each request's own microsecond timestamp
in `config.time_zone` (`fm.timefeatures.hour_of_day`); no caller passes an hour, so training,
logging and serving cannot disagree about it. Item ids pass through as logged: the model maps
ids outside its vocabulary to its OOV row (`fm.model.ItemContext`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from fm.config import FMConfig
from fm.history import UserHistories, surface_codes
from fm.timefeatures import hour_of_day, timestamps_us


@dataclass
class Batch:
    hist_item: Tensor  # [B, N] long, left-aligned, 0 in padding
    hist_surface: Tensor  # [B, N] long
    hist_hour: Tensor  # [B, N] long, local hour of day of the event (config.time_zone)
    hist_action: Tensor  # [B, N] long
    hist_rank: Tensor  # [B, N] long, 0 = most recent event
    hist_gap: Tensor  # [B, N] long, time bucket of (last history event - this event)
    hist_len: Tensor  # [B] long, number of real history tokens
    tgt_item: Tensor  # [B, M] long
    tgt_surface: Tensor  # [B, M] long
    tgt_hour: Tensor  # [B, M] long, local hour of day of the request (config.time_zone)
    tgt_gap: Tensor  # [B] long, time bucket of (request time - last history event), 0 if none
    tgt_mask: Tensor  # [B, M] bool, True for real candidates
    labels: Tensor | None = None  # [B, M, T] float32 over config.fm_tasks, NaN = not applicable

    @property
    def n_hist(self) -> int:
        return self.hist_item.shape[1]

    @property
    def n_tgt(self) -> int:
        return self.tgt_item.shape[1]

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if v is not None else None for k, v in moved.items()})


def time_bucket(dt_us: np.ndarray, n_buckets: int) -> np.ndarray:
    """log2 buckets of a gap in seconds, in [1, n_buckets); bucket 0 means "no gap".

    dt_us: microseconds, int or float (callers subtract in float64: two int64 instants
    ~146,000 years apart would overflow int64). Negative gaps count as 0."""
    sec = np.maximum(np.asarray(dt_us, dtype=np.float64), 0.0) / 1e6
    return np.clip(1 + np.floor(np.log2(1.0 + sec)), 1, n_buckets - 1).astype(np.int64)


def pad_ragged(offsets: np.ndarray, values: np.ndarray, fill: float = 0) -> np.ndarray:
    """Flat values split by offsets [R + 1] -> [R, max_len(, ...)] padded with `fill`."""
    lens = np.diff(offsets)
    width = int(lens.max()) if len(lens) else 0
    slot = np.arange(width)
    valid = slot[None, :] < lens[:, None]  # [R, W]
    rows = np.where(valid, offsets[:-1, None] + slot[None, :], 0)
    if len(values) == 0:
        return np.full((len(lens), width, *values.shape[1:]), fill, dtype=values.dtype)
    out = values[rows]
    out[~valid] = fill
    return out


def collate(
    histories: UserHistories,
    config: FMConfig,
    user_ids: np.ndarray,
    ts_us: np.ndarray,
    tgt_offsets: np.ndarray,
    tgt_item: np.ndarray,
    tgt_surface: np.ndarray,
    *,
    labels: np.ndarray | None = None,
) -> Batch:
    """Padded tensors for B requests.

    user_ids, ts_us: [B] (ts_us: int64 microseconds, UTC); tgt_offsets: [B + 1] splitting the
    flat candidate arrays tgt_item (any id) / tgt_surface (codes into config.surfaces) /
    labels [n, T]. Every hour feature is derived from the timestamps in config.time_zone:
    a history event's from its own time, a candidate's from its request's time.
    """
    ts_us = np.asarray(ts_us, dtype=np.int64)
    tgt_offsets = np.asarray(tgt_offsets, dtype=np.int64)
    end, length = histories.lookup(user_ids, ts_us, config.max_history)
    n = int(length.max()) if len(length) else 0
    slot = np.arange(n)
    valid = slot[None, :] < length[:, None]  # [B, N]
    rows = np.where(valid, (end - length)[:, None] + slot[None, :], 0)
    # histories may code surfaces in another order than the model: translate to the model's
    to_model = surface_codes(np.asarray(histories.surfaces, dtype=object), config.surfaces)

    def gather(a: np.ndarray) -> np.ndarray:  # [E] -> [B, N], 0 in padding
        return np.where(valid, a[rows], 0)

    tz = config.time_zone
    hist_ts = gather(histories.ts_us)  # [B, N]
    has_hist = length > 0
    last_ts = histories.ts_us[np.maximum(end - 1, 0)] if len(histories) else np.zeros_like(end)
    last_ts = np.where(has_hist, last_ts, 0)  # [B] time of the most recent history event
    hist_gap = np.where(
        valid, time_bucket(last_ts[:, None] - hist_ts.astype(np.float64), config.n_time_buckets), 0
    )
    req_hour = hour_of_day(ts_us, tz)  # [B]
    tgt_gap = np.where(
        has_hist, time_bucket(ts_us - last_ts.astype(np.float64), config.n_time_buckets), 0
    )

    def long(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    def per_target(a: np.ndarray, fill: float = 0) -> np.ndarray:  # flat [n] -> [B, M]
        return pad_ragged(tgt_offsets, np.asarray(a), fill)

    return Batch(
        hist_item=long(gather(histories.item)),
        hist_surface=long(gather(to_model[histories.surface])),
        hist_hour=long(np.where(valid, hour_of_day(hist_ts, tz), 0)),
        hist_action=long(gather(histories.action)),
        hist_rank=long(np.where(valid, length[:, None] - 1 - slot[None, :], 0)),
        hist_gap=long(hist_gap),
        hist_len=long(length),
        tgt_item=long(per_target(tgt_item)),
        tgt_surface=long(per_target(tgt_surface)),
        tgt_hour=long(per_target(np.repeat(req_hour, np.diff(tgt_offsets)))),
        tgt_gap=long(tgt_gap),
        tgt_mask=torch.as_tensor(per_target(np.ones(len(tgt_item), dtype=bool), fill=False)),
        labels=None
        if labels is None
        else torch.as_tensor(per_target(labels.astype(np.float32), fill=np.nan)),
    )


@dataclass
class Requests:
    """An event log grouped into requests, ordered by (request time, request_id)."""

    request_id: np.ndarray  # [R]
    user_id: np.ndarray  # [R]
    ts_us: np.ndarray  # [R] int64
    offsets: np.ndarray  # [R + 1] into the candidate arrays below
    item: np.ndarray  # [n] int64
    surface: np.ndarray  # [n] int64 code into config.surfaces
    labels: np.ndarray  # [n, T] float32 over config.fm_tasks

    @classmethod
    def from_events(cls, df: pd.DataFrame, config: FMConfig) -> Requests:
        missing = [t for t in config.fm_tasks if t not in df.columns]
        if missing:
            raise ValueError(f"event log lacks FM task columns: {missing}")
        rid = df["request_id"].to_numpy(np.int64)
        ts = timestamps_us(df["event_timestamp"])
        order = np.lexsort((rid, ts))  # time-ordered; one request's rows are contiguous
        rid, ts = rid[order], ts[order]
        starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]]) if len(rid) else np.array([], int)
        labels = df[config.fm_tasks].to_numpy(np.float32).reshape(len(df), len(config.fm_tasks))
        return cls(
            request_id=rid[starts],
            user_id=df["user_id"].to_numpy(np.int64)[order][starts],
            ts_us=ts[starts],
            offsets=np.append(starts, len(rid)).astype(np.int64),
            item=df["item_id"].to_numpy(np.int64)[order],
            surface=surface_codes(df["surface"].to_numpy(object), config.surfaces)[order],
            labels=labels[order],
        )

    def __len__(self) -> int:
        return len(self.request_id)

    def batch(self, lo: int, hi: int, histories: UserHistories, config: FMConfig) -> Batch:
        """Requests lo..hi-1 as one padded batch."""
        a, b = self.offsets[lo], self.offsets[hi]
        rows = slice(a, b)
        return collate(
            histories,
            config,
            self.user_id[lo:hi],
            self.ts_us[lo:hi],
            self.offsets[lo : hi + 1] - a,
            self.item[rows],
            self.surface[rows],
            labels=self.labels[rows],
        )


def random_batch(
    config: FMConfig, hist_len: list[int], n_targets: int, seed: int = 0, n_hist: int | None = None
) -> Batch:
    """A random request batch straight in tensors (no event log): B = len(hist_len) rows,
    history padded to n_hist (default: the longest), n_targets candidates per row."""
    g = torch.Generator().manual_seed(seed)
    hl = torch.as_tensor(hist_len, dtype=torch.long)
    B = len(hist_len)
    N = int(hl.max()) if n_hist is None and B else int(n_hist or 0)
    valid = torch.arange(N)[None, :] < hl[:, None]

    def ints(hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, hi, shape, generator=g)

    return Batch(
        hist_item=ints(config.n_items, B, N) * valid,
        hist_surface=ints(len(config.surfaces), B, N) * valid,
        hist_hour=ints(config.n_hours, B, N) * valid,
        hist_action=ints(config.n_actions, B, N) * valid,
        hist_rank=(hl[:, None] - 1 - torch.arange(N)[None, :]).clamp(min=0) * valid,
        hist_gap=ints(config.n_time_buckets, B, N) * valid,
        hist_len=hl,
        tgt_item=ints(config.n_items, B, n_targets),
        tgt_surface=ints(len(config.surfaces), B, n_targets),
        tgt_hour=ints(config.n_hours, B, n_targets),
        tgt_gap=ints(config.n_time_buckets, B),
        tgt_mask=torch.ones(B, n_targets, dtype=torch.bool),
    )
