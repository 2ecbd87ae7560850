"""HSTULayer: one Hierarchical Sequential Transduction Unit, pre-norm with a residual.

    U, V, Q, K = split(silu(W_uvqk · LN(x)))
    A V        = silu(Q K^T / sqrt(dh)) * mask / N_fixed  @ V
    x'         = x + W_o(dropout(LN(A V) * U))

Two ways to run it, giving the same target outputs:
  * `forward` over the joint [history | targets] sequence (training);
  * `forward` over the history alone (returning its K/V), then `forward_targets` for any number
    of targets against that cached K/V (inference: history once, each target O(N)).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fm import ops


class HSTULayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, norm_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_len = norm_len
        self.norm_in = nn.LayerNorm(d_model)
        self.uvqk = nn.Linear(d_model, 4 * d_model)  # one fused projection for U, V, Q, K
        self.norm_attn = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, H, L, dh]
        B, L, d = x.shape
        return x.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:  # [B, H, L, dh] -> [B, L, d]
        B, H, L, dh = x.shape
        return x.transpose(1, 2).reshape(B, L, H * dh)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: [B, L, d] -> u [B, L, d]; q, k, v [B, H, L, dh]."""
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)
        return u, self._heads(q), self._heads(k), self._heads(v)

    def combine(self, x: Tensor, av: Tensor, u: Tensor) -> Tensor:
        """Gate the normalised attention output by U, project, add the residual."""
        return x + self.out(self.dropout(self.norm_attn(self._merge(av)) * u))

    def forward(
        self, x: Tensor, hist_len: Tensor, n_hist: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: [B, N + M, d] joint sequence; hist_len: [B] -> (x' [B, N + M, d], (k, v) of x)."""
        u, q, k, v = self.project(x)
        av = ops.target_aware_attention(q, k, v, hist_len, n_hist, self.norm_len)
        return self.combine(x, av, u), (k, v)

    def forward_targets(self, x_t: Tensor, kv_h: tuple[Tensor, Tensor], hist_len: Tensor) -> Tensor:
        """x_t: [B, M, d] targets; kv_h: this layer's history K, V [B, H, N, dh] -> [B, M, d]."""
        u, q, k, v = self.project(x_t)
        av = ops.cached_target_attention(q, k, v, *kv_h, hist_len, self.norm_len)
        return self.combine(x_t, av, u)
