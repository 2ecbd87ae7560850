"""Pure tensor ops of the HSTU encoder: the target-aware mask and SiLU attention.

Shapes: B batch, H heads, N history slots (padded), M targets, L = N + M, dh head dim.

The joint sequence is [history (left-aligned, padded to N) | targets (M)]:
  * history token i sees history tokens j <= i that are not padding (causal);
  * target token n + j sees every valid history token and itself, never another target.
Attention is HSTU's pointwise SiLU divided by a FIXED length (not softmax, not the batch max),
so a token's output depends only on the tokens it may see.

`target_aware_attention` and `cached_target_attention` are the dispatch points: they pick a
backend by device. Only the PyTorch reference exists now; a fused Triton kernel registers
itself with `register_backend("cuda", ...)` and is tested against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def target_aware_mask(n_hist: int, n_tgt: int, hist_len: Tensor) -> Tensor:
    """Bool [B, L, L], True where query row may attend to key column. hist_len: [B]."""
    L = n_hist + n_tgt
    pos = torch.arange(L, device=hist_len.device)
    q, k = pos[:, None], pos[None, :]  # [L, 1], [1, L]
    valid_key = k < hist_len[:, None, None]  # [B, 1, L]: a real (non-padding) history token
    hist_row = (q < n_hist) & (k <= q)  # [L, L] causal inside the history block
    tgt_row = q >= n_hist  # [L, 1]
    mask = (hist_row & valid_key) | (tgt_row & (valid_key | (k == q)))
    return mask  # [B, L, L]


def hstu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, norm_len: int) -> Tensor:
    """Reference HSTU attention. q, k, v: [B, H, L, dh]; mask: [B, L, L] bool -> [B, H, L, dh].

    weights = silu(q k^T / sqrt(dh)) * mask / norm_len ; out = weights @ v
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    w = F.silu(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale)  # [B, H, L, L]
    # where(), not multiply: a masked-out value must not leak even as 0 * inf = nan.
    w = torch.where(mask[:, None], w, torch.zeros((), dtype=w.dtype, device=w.device))
    return torch.einsum("bhqk,bhkd->bhqd", w / norm_len, v)


def cached_target_attention_reference(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    k_h: Tensor,
    v_h: Tensor,
    hist_len: Tensor,
    norm_len: int,
) -> Tensor:
    """Targets against cached history K/V plus themselves: O(M*N), not O((N+M)^2).

    q_t, k_t, v_t: [B, H, M, dh]; k_h, v_h: [B, H, N, dh]; hist_len: [B] -> [B, H, M, dh].
    Same numbers as rows n..n+M of `hstu_attention` over the joint sequence.
    """
    scale = 1.0 / math.sqrt(q_t.shape[-1])
    n = k_h.shape[2]
    valid = torch.arange(n, device=hist_len.device)[None, :] < hist_len[:, None]  # [B, N]
    w_h = F.silu(torch.einsum("bhmd,bhnd->bhmn", q_t, k_h) * scale)  # [B, H, M, N]
    w_h = torch.where(
        valid[:, None, None], w_h, torch.zeros((), dtype=w_h.dtype, device=w_h.device)
    )
    w_self = F.silu((q_t * k_t).sum(-1, keepdim=True) * scale)  # [B, H, M, 1]
    return (torch.einsum("bhmn,bhnd->bhmd", w_h, v_h) + w_self * v_t) / norm_len


def target_aware_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, hist_len: Tensor, n_hist: int, norm_len: int
) -> Tensor:
    """Joint-sequence attention with the target-aware mask built from hist_len."""
    mask = target_aware_mask(n_hist, q.shape[2] - n_hist, hist_len)
    return hstu_attention(q, k, v, mask, norm_len)


# ---- backend dispatch --------------------------------------------------------------------------

JointFn = Callable[[Tensor, Tensor, Tensor, Tensor, int, int], Tensor]
CachedFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int], Tensor]

_BACKENDS: dict[str, tuple[JointFn, CachedFn]] = {}


def register_backend(device_type: str, joint: JointFn, cached: CachedFn) -> None:
    """Plug a faster implementation (e.g. a Triton kernel) for tensors on `device_type`."""
    _BACKENDS[device_type] = (joint, cached)


def target_aware_attention(
    q: Tensor, k: Tensor, v: Tensor, hist_len: Tensor, n_hist: int, norm_len: int
) -> Tensor:
    """q, k, v: [B, H, N + M, dh] over [history | targets] -> [B, H, N + M, dh]."""
    backend = _BACKENDS.get(q.device.type)
    fn = backend[0] if backend else target_aware_attention_reference
    return fn(q, k, v, hist_len, n_hist, norm_len)


def cached_target_attention(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    k_h: Tensor,
    v_h: Tensor,
    hist_len: Tensor,
    norm_len: int,
) -> Tensor:
    """Targets [B, H, M, dh] against cached history [B, H, N, dh] -> [B, H, M, dh]."""
    backend = _BACKENDS.get(q_t.device.type)
    fn = backend[1] if backend else cached_target_attention_reference
    return fn(q_t, k_t, v_t, k_h, v_h, hist_len, norm_len)
