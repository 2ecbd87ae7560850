"""Target-aware inference: TAEs for (user, request time, surface, candidate) rows.

Rows are grouped by (user, request time, surface). Each group's history is encoded once
(per-layer K/V), then all its candidates attend to that cached history plus themselves, so M
candidates cost about one forward pass, not M. Many groups share one forward.
"""

from __future__ import annotations

import numpy as np
import torch

from fm.batching import collate
from fm.history import UserHistories, surface_codes
from fm.model import FoundationModel


class TAEEngine:
    def __init__(
        self,
        model: FoundationModel,
        histories: UserHistories,
        device: str | torch.device = "cpu",
        *,
        max_groups: int = 512,  # requests per forward
        max_rows: int = 16384,  # candidates per forward (bounds padding memory)
    ) -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.histories = histories
        self.device = torch.device(device)
        self.max_groups, self.max_rows = max_groups, max_rows

    @property
    def dim(self) -> int:
        return self.config.d_model

    @torch.no_grad()
    def compute(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        ts_us: np.ndarray,
        surfaces: np.ndarray,
        hours: np.ndarray,
    ) -> np.ndarray:
        """One TAE per input row -> float32 [n, d], in the input row order."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        ts_us = np.asarray(ts_us, dtype=np.int64)
        hours = np.asarray(hours, dtype=np.int64)
        surf = surface_codes(np.asarray(surfaces, dtype=object), self.config.surfaces)
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
                self.histories,
                self.config,
                u[starts[g0:g1]],
                t[starts[g0:g1]],
                offsets[g0 : g1 + 1] - a,
                item_ids[rows],
                surf[rows],
                hours[rows],
            ).to(self.device)
            state = self.model.encode_history(batch)  # history once per group
            tae = self.model.encode_targets(batch, state)  # [G, M, d]
            # tgt_mask is row-major over (group, candidate): same order as `rows`
            out[rows] = tae[batch.tgt_mask].float().cpu().numpy()
            g0 = g1
        return out

    def compute_request(
        self, user_id: int, ts_us: int, surface: str, hour: int, item_ids: np.ndarray
    ) -> np.ndarray:
        """TAEs of one request's candidates -> float32 [M, d]."""
        m = len(item_ids)
        return self.compute(
            np.full(m, user_id, dtype=np.int64),
            np.asarray(item_ids, dtype=np.int64),
            np.full(m, ts_us, dtype=np.int64),
            np.full(m, surface, dtype=object),
            np.full(m, hour, dtype=np.int64),
        )
