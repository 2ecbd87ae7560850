"""The user-level embedding (UE) baseline: an FM variant that never sees the candidate.

Same item/context tokens, same HSTU layers, same data, window and multi-task loss as the
FoundationModel, but the history is summarised by ONE candidate-free query token:

    q     = learned query + gap(request time - last history event)
    UE    = LN(HSTU target pass of q against the encoded history)       # [B, d], no candidate
    h_j   = LN(f(item_j, ctx_j) + MLP([UE, f(item_j, ctx_j)]))           # late fusion in the head

The heads (main head, per-surface alignment modules) read h_j exactly as the FM's read a TAE,
so the only difference from the FM is *where* the candidate meets the history: after the
encoder (UE) instead of inside the attention (TAE). `compute_user_embeddings` gives the UE of
(user, time) rows from the history strictly before that time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from fm.batching import Batch, collate
from fm.config import FMConfig
from fm.history import UserHistories
from fm.model import FoundationModel
from fm.train import TrainResult, train_streaming


class UserEmbeddingModel(FoundationModel):
    """FoundationModel whose encoder output ignores the candidate (see module docstring)."""

    def __init__(self, config: FMConfig, item_content: object = None) -> None:
        super().__init__(config, item_content)
        d = config.d_model
        self.query = nn.Parameter(torch.randn(d) * 0.1)
        self.fuse = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.fuse_norm = nn.LayerNorm(d)

    def user_embedding(self, b: Batch) -> Tensor:
        """[B, d]: reads only the history fields and the request-time gap, never tgt_* items."""
        state = self.encode_history(b)
        q = self.drop(self.query + self.tgt_gap(b.tgt_gap))[:, None, :]  # [B, 1, d]
        for layer, kv_l in zip(self.layers, state.kv, strict=True):
            q = layer.forward_targets(q, kv_l, state.hist_len)
        return self.norm_out(q)[:, 0]

    def forward(self, b: Batch) -> Tensor:
        """[B, M, d]: UE combined with each candidate's features (what the heads read)."""
        ue = self.user_embedding(b)
        cand = self.target_features(b)
        ue = ue[:, None, :].expand_as(cand)
        return self.fuse_norm(cand + self.fuse(torch.cat([ue, cand], dim=-1)))


def train_ue_streaming(
    events: pd.DataFrame,
    config: FMConfig,
    *,
    end: pd.Timestamp | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    item_content: Any = None,
) -> TrainResult:
    """One streaming pass, exactly as `fm.train.train_streaming` (same batches, optimiser,
    loss and progressive-validation NE), for the UE model. No checkpoints."""
    return train_streaming(
        events, config, end=end, max_steps=max_steps, progress=progress,
        item_content=item_content, model_factory=UserEmbeddingModel,
    )


@torch.no_grad()
def compute_user_embeddings(
    model: UserEmbeddingModel,
    histories: UserHistories,
    user_ids: np.ndarray,
    ts_us: np.ndarray,
    *,
    batch_rows: int = 2048,
) -> np.ndarray:
    """UE of each (user, time) row -> float32 [n, d], from the user's events strictly before
    ts_us (at most config.max_history of them). Rows sharing (user, time) are encoded once."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    ts_us = np.asarray(ts_us, dtype=np.int64)
    out = np.zeros((len(user_ids), model.dim), dtype=np.float32)
    if len(user_ids) == 0:
        return out
    pairs, inverse = np.unique(np.stack([user_ids, ts_us], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    uniq = np.zeros((len(pairs), model.dim), dtype=np.float32)
    was_training = model.training
    model.eval()
    for lo in range(0, len(pairs), batch_rows):
        p = pairs[lo : lo + batch_rows]
        n = len(p)
        zeros = np.zeros(n, dtype=np.int64)  # a placeholder candidate the UE never reads
        batch = collate(histories, model.config, p[:, 0], p[:, 1], np.arange(n + 1), zeros, zeros)
        uniq[lo : lo + n] = model.user_embedding(batch).float().cpu().numpy()
    model.train(was_training)
    out[:] = uniq[inverse]
    return out
