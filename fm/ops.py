"""Pure tensor ops of the HSTU encoder: the target-aware mask and SiLU attention.

Shapes: B batch, H heads, N history slots (padded), M targets, L = N + M, dh head dim.

The joint sequence is [history (left-aligned, padded to N) | targets (M)]:
  * history token i sees history tokens j <= i that are not padding (causal);
  * target token n + j sees every valid history token and itself, never another target.
Attention is HSTU's pointwise SiLU divided by a FIXED length (not softmax, not the batch max),
so a token's output depends only on the tokens it may see.

`target_aware_attention` and `cached_target_attention` are the dispatch points: they pick a
backend by device. The PyTorch reference serves every device without a registered backend;
`register_default_backends` imports the fused Triton kernel (`fm.triton_attention`) and
registers it for "cuda" when CUDA and triton are available (the dispatcher imports the
backends, never the reverse). The kernel is tested against the reference (on CPU under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def target_aware_mask(n_hist: int, n_tgt: int, hist_len: Tensor) -> Tensor:
    """Bool [B, L, L], True where query row may attend to key column. hist_len: [B]."""
    L = n_hist + n_tgt
    pos = torch.arange(L, device=hist_len.device)
    q, k = pos[:, None], pos[None, :]  # [L, 1], [1, L]
    # [L, L] parts, shared by the batch: causal inside the history, everything for targets
    allowed = (k <= q) | (q >= n_hist)
    tgt_self = (k == q) & (q >= n_hist)  # a target also sees itself (never another target)
    valid_key = k < hist_len[:, None, None]  # [B, 1, L]: a real (non-padding) history token
    return (valid_key & allowed) | tgt_self  # [B, L, L]


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def hstu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, norm_len: int) -> Tensor:
    """Reference HSTU attention. q, k, v: [B, H, L, dh]; mask: [B, L, L] bool -> [B, H, L, dh].

    weights = silu(q k^T / sqrt(dh)) * mask ; out = (weights @ v) / norm_len
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhqd,bhkd->bhqk", q * scale, k)  # [B, H, L, L]
    # where()/masked_fill, not multiply: a masked-out value must not leak even as 0 * inf = nan.
    if _needs_grad(q, k, v):
        w = torch.where(mask[:, None], F.silu(s), torch.zeros((), dtype=s.dtype, device=s.device))
    else:  # inference: in place, no extra [B, H, L, L] buffers
        w = F.silu(s, inplace=True).masked_fill_(~mask[:, None], 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", w, v) / norm_len


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
    q_t = q_t * scale
    s_h = torch.einsum("bhmd,bhnd->bhmn", q_t, k_h)  # [B, H, M, N]
    if _needs_grad(q_t, k_h, v_h):
        zero = torch.zeros((), dtype=s_h.dtype, device=s_h.device)
        w_h = torch.where(valid[:, None, None], F.silu(s_h), zero)
    else:
        w_h = F.silu(s_h, inplace=True).masked_fill_(~valid[:, None, None], 0.0)
    w_self = F.silu((q_t * k_t).sum(-1, keepdim=True))  # [B, H, M, 1]
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
    """Plug a faster forward-only implementation (e.g. a Triton kernel) for tensors on
    `device_type`; it serves calls that need no gradient (inference)."""
    _BACKENDS[device_type] = (joint, cached)


def _backend(device_type: str, *xs: Tensor) -> tuple[JointFn, CachedFn] | None:
    """The registered backend for the device, unless autograd needs a graph: backends are
    forward-only kernels, so training always goes through the differentiable reference."""
    if _needs_grad(*xs):
        return None
    return _BACKENDS.get(device_type)


def target_aware_attention(
    q: Tensor, k: Tensor, v: Tensor, hist_len: Tensor, n_hist: int, norm_len: int
) -> Tensor:
    """q, k, v: [B, H, N + M, dh] over [history | targets] -> [B, H, N + M, dh]."""
    backend = _backend(q.device.type, q, k, v)
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
    backend = _backend(q_t.device.type, q_t, k_t, v_t, k_h, v_h)
    fn = backend[1] if backend else cached_target_attention_reference
    return fn(q_t, k_t, v_t, k_h, v_h, hist_len, norm_len)


def register_default_backends() -> bool:
    """Use the fused Triton kernel on CUDA when both CUDA and triton are there.

    Set FOUNDEX_FM_TRITON=0 to keep the PyTorch reference everywhere. -> True if registered.
    """
    if os.environ.get("FOUNDEX_FM_TRITON", "1") == "0" or not torch.cuda.is_available():
        return False
    try:
        from fm import triton_attention
    except ImportError:  # no triton on this platform: the reference path stays
        return False
    register_backend(
        "cuda",
        triton_attention.target_aware_attention_triton,
        triton_attention.cached_target_attention_triton,
    )
    return True


# The dispatcher picks up its default backends when first imported (the Triton kernel on CUDA;
# the PyTorch reference elsewhere), so every model, engine and benchmark sees the same ones.
register_default_backends()
