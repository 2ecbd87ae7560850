"""ExpertFrame: the table an expert trains on, evaluates on and scores, and its tensors.

An ExpertFrame is a pandas DataFrame, one row per (user, candidate, time):

    user_id, item_id     int64
    event_timestamp      datetime64[us, UTC]
    surface              str
    <task>...            float32 labels, NaN where the task is not valid (not needed to score)
    embedding            object: np.ndarray float32 [d] or None where the TAE is missing;
                         absent for the no-FM baseline
    category             int64 (NaN allowed at serving: unknown)
    quality              float32 (NaN allowed at serving: read as 0)
    recent_items         object: np.ndarray int64 [k], item_id + 1, 0 = padding, right-aligned
    recent_actions       object: np.ndarray int64 [k], action + 1, 0 = padding

`embedding`, category and quality come from the store's point-in-time join; the history from
`add_recent_history`. Serving builds the same frame from online reads, so both paths share
`to_tensors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from experts.config import ExpertConfig
from experts.features import recent_history
from store_bridge.events.schema import EVENT_TIMESTAMP, timestamps_us

ExpertFrame = pd.DataFrame  # documented above; an alias so signatures say what they expect

HISTORY_COLUMNS = ("recent_items", "recent_actions")


def add_recent_history(frame: pd.DataFrame, events: pd.DataFrame, k: int) -> pd.DataFrame:
    """A copy of `frame` with each row's last k events strictly before its timestamp."""
    items, actions = recent_history(
        events,
        frame["user_id"].to_numpy(dtype=np.int64),
        timestamps_us(frame[EVENT_TIMESTAMP]),
        k,
    )
    out = frame.copy()
    out["recent_items"] = list(items)
    out["recent_actions"] = list(actions)
    return out


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float):  # pandas turns None into NaN in some operations
        return bool(np.isnan(value))
    return False


def stack_embeddings(column: pd.Series, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The `embedding` column as a float32 [n, dim] matrix (zeros where missing) and a mask."""
    n = len(column)
    tae = np.zeros((n, dim), dtype=np.float32)
    mask = np.zeros(n, dtype=np.float32)
    values = column.to_numpy(dtype=object)
    present = np.fromiter((not _is_missing(v) for v in values), dtype=bool, count=n)
    if present.any():
        rows = [np.asarray(v, dtype=np.float32) for v in values[present]]
        bad = {r.shape for r in rows if r.shape != (dim,)}
        if bad:
            raise ValueError(f"embedding rows must have shape ({dim},), found {sorted(bad)}")
        tae[present] = np.stack(rows)
        # A row holding NaN is as good as missing: never let it into the network.
        ok = ~np.isnan(tae).any(axis=1)
        tae[~ok] = 0.0
        mask[present & ok] = 1.0
    return tae, mask


def stack_history(column: pd.Series, k: int) -> np.ndarray:
    """Right-aligned [n, k] int64: longer rows keep their last k, shorter ones are left-padded."""
    out = np.zeros((len(column), k), dtype=np.int64)
    for i, row in enumerate(column.to_numpy(dtype=object)):
        if row is None:
            continue
        tail = np.asarray(row, dtype=np.int64)[-k:]
        if len(tail):
            out[i, k - len(tail) :] = tail
    return out


def _history(frame: pd.DataFrame, k: int) -> dict[str, np.ndarray]:
    missing = [c for c in HISTORY_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks {missing}; call add_recent_history first")
    out = {}
    for col in HISTORY_COLUMNS:
        values = frame[col].to_numpy(dtype=object)
        try:  # fast path: every row already a length-k array
            out[col] = np.stack(values).astype(np.int64, copy=False)
            if out[col].shape != (len(frame), k):
                raise ValueError
        except (ValueError, TypeError):  # ragged, None rows or another length
            out[col] = stack_history(frame[col], k)
    return out


def label_matrix(frame: pd.DataFrame, tasks: Sequence[str]) -> np.ndarray:
    """[n, T] float32 labels; a task column the frame lacks is all NaN."""
    labels = np.full((len(frame), len(tasks)), np.nan, dtype=np.float32)
    for j, task in enumerate(tasks):
        if task in frame.columns:
            labels[:, j] = frame[task].to_numpy(dtype=np.float32, na_value=np.nan)
    return labels


def to_tensors(
    frame: pd.DataFrame, cfg: ExpertConfig, tae_dim: int | None
) -> dict[str, torch.Tensor]:
    """The model's inputs (and `labels` [n, T] when any task column is present).

    Keys: tae (absent when tae_dim is None), tae_mask, recent_items, recent_actions, item_id,
    category (-1 = unknown), quality, labels.
    """
    n = len(frame)
    out: dict[str, torch.Tensor] = {}
    if tae_dim is not None:
        if "embedding" not in frame.columns:
            raise ValueError(f"expert {cfg.name!r} pins {cfg.fm_version}: frame lacks `embedding`")
        tae, mask = stack_embeddings(frame["embedding"], tae_dim)
        out["tae"] = torch.from_numpy(tae)
        out["tae_mask"] = torch.from_numpy(mask)
    else:
        out["tae_mask"] = torch.zeros(n)
    for col, values in _history(frame, cfg.history_length).items():
        out[col] = torch.from_numpy(values)
    out["item_id"] = torch.from_numpy(frame["item_id"].to_numpy(dtype=np.int64))
    if "category" in frame.columns:
        cat = frame["category"].to_numpy(dtype=np.float64, na_value=np.nan)
        out["category"] = torch.from_numpy(np.where(np.isnan(cat), -1, cat).astype(np.int64))
    else:
        out["category"] = torch.full((n,), -1, dtype=torch.int64)
    if "quality" in frame.columns:
        quality = frame["quality"].to_numpy(dtype=np.float32, na_value=np.nan)
        out["quality"] = torch.from_numpy(np.nan_to_num(quality, nan=0.0))
    else:
        out["quality"] = torch.zeros(n)
    if any(t in frame.columns for t in cfg.tasks):
        out["labels"] = torch.from_numpy(label_matrix(frame, cfg.tasks))
    return out


MODEL_INPUTS = (
    "tae",
    "tae_mask",
    "recent_items",
    "recent_actions",
    "item_id",
    "category",
    "quality",
)


def batch_inputs(tensors: dict[str, torch.Tensor], idx: torch.Tensor | slice) -> dict:
    """The model's keyword arguments for the rows `idx` (tae None for the baseline)."""
    return {k: (tensors[k][idx] if k in tensors else None) for k in MODEL_INPUTS}
