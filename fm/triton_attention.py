"""Fused Triton forward of HSTU attention with the target-aware mask, over ragged batches.

One kernel serves both attention paths of `fm.ops`:

  * joint:  q, k, v [B, H, N + M, dh] over [history (left-aligned, padded to N) | M targets];
  * cached: targets q_t, k_t, v_t [B, H, M, dh] against cached history k_h, v_h [B, H, N, dh].

Each program owns BLOCK_M query rows of one (batch row, head). Query row m sits at sequence
position p = q_pos0 + m (q_pos0 = 0 for joint, N for cached). It streams the history keys
j < hist_len[b] (only j <= p for a history row: causal), computing

    w = silu(q k^T * scale), masked by `where` (padding never leaks, not even as 0 * inf)
    acc += w @ v

and a target row (p >= N) adds its own term silu(q . k_self * scale) * v_self elementwise, so a
target never meets another target. Finally acc / norm_len: a FIXED length, not the batch's
longest row, so the output of a row is independent of the batch. History rows stop their key
loop at the block's last position, so the causal part costs about half of a dense pass, and
padding keys beyond hist_len[b] are never loaded.

`fm.ops` (the dispatcher) imports this module and registers its two entry points for device
"cuda" when CUDA and triton are available; this module never imports the dispatcher.
Everything else uses the PyTorch reference. The parity tests run this same kernel
on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _hstu_target_aware_fwd(
    Q,
    KH,
    VH,
    KS,
    VS,
    Out,
    HL,
    sq_b,
    sq_h,
    sq_l,
    skh_b,
    skh_h,
    skh_l,
    svh_b,
    svh_h,
    svh_l,
    sks_b,
    sks_h,
    sks_l,
    svs_b,
    svs_h,
    svs_l,
    so_b,
    so_h,
    so_l,
    n_heads,
    n_rows,  # query rows (N + M for joint, M for cached)
    n_hist,  # N: positions >= N are targets
    q_pos0,  # sequence position of query row 0
    dh,
    scale,
    inv_norm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hl = tl.minimum(tl.load(HL + b).to(tl.int32), n_hist)  # valid history tokens of row b

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_rows
    d_ok = offs_d < dh
    pos = q_pos0 + offs_m  # sequence position of each query row
    is_tgt = pos >= n_hist

    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # Keys a row of this block may see: all valid history for targets, j <= p for history rows.
    last_pos = q_pos0 + start_m + BLOCK_M - 1
    kv_end = tl.where(last_pos >= n_hist, hl, tl.minimum(hl, last_pos + 1))
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hl
        ld = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            KH + b * skh_b + h * skh_h + offs_n[:, None] * skh_l + offs_d[None, :],
            mask=ld,
            other=0.0,
        )
        v = tl.load(
            VH + b * svh_b + h * svh_h + offs_n[:, None] * svh_l + offs_d[None, :],
            mask=ld,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        w = s * tl.sigmoid(s)  # silu
        see = n_ok[None, :] & (is_tgt[:, None] | (offs_n[None, :] <= pos[:, None]))
        w = tl.where(see, w, 0.0)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)

    # A target's own key/value: the only non-history token it sees.
    ld_self = (row_ok & is_tgt)[:, None] & d_ok[None, :]
    k_self = tl.load(
        KS + b * sks_b + h * sks_h + offs_m[:, None] * sks_l + offs_d[None, :],
        mask=ld_self,
        other=0.0,
    )
    v_self = tl.load(
        VS + b * svs_b + h * svs_h + offs_m[:, None] * svs_l + offs_d[None, :],
        mask=ld_self,
        other=0.0,
    )
    s_self = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1) * scale
    w_self = tl.where(is_tgt, s_self * tl.sigmoid(s_self), 0.0)
    acc += w_self[:, None] * v_self.to(tl.float32)

    o_ptrs = Out + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :]
    tl.store(
        o_ptrs, (acc * inv_norm).to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
    )


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(
    q: Tensor,
    k_hist: Tensor,
    v_hist: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    hist_len: Tensor,
    n_hist: int,
    q_pos0: int,
    norm_len: int,
    block_m: int | None,
    block_n: int | None,
) -> Tensor:
    B, H, n_rows, dh = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if B * H * n_rows == 0:
        return out
    q, k_hist, v_hist, k_self, v_self = map(
        _last_dim_contiguous, (q, k_hist, v_hist, k_self, v_self)
    )
    if hist_len.shape != (B,):
        raise ValueError(f"hist_len must be [{B}], got {tuple(hist_len.shape)}")
    hist_len = hist_len.to(device=q.device, dtype=torch.int32).contiguous()
    interpreted = q.device.type == "cpu"
    block_m = block_m or (16 if interpreted else 64)
    block_n = block_n or (16 if interpreted else 64)
    block_d = max(16, triton.next_power_of_2(dh))
    # fp32 in, exact fp32 products (no TF32): TAEs are logged and served, they must agree
    precision = "ieee" if q.dtype == torch.float32 else None
    grid = (triton.cdiv(n_rows, block_m), B * H)
    _hstu_target_aware_fwd[grid](
        q,
        k_hist,
        v_hist,
        k_self,
        v_self,
        out,
        hist_len,
        *q.stride()[:3],
        *k_hist.stride()[:3],
        *v_hist.stride()[:3],
        *k_self.stride()[:3],
        *v_self.stride()[:3],
        *out.stride()[:3],
        H,
        n_rows,
        n_hist,
        q_pos0,
        dh,
        1.0 / math.sqrt(dh),
        1.0 / norm_len,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=precision,
    )
    return out


def target_aware_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hist_len: Tensor,
    n_hist: int,
    norm_len: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Joint [history | targets] attention: q, k, v [B, H, N + M, dh] -> [B, H, N + M, dh].

    Same numbers as `fm.ops.target_aware_attention_reference`.
    """
    return _launch(q, k, v, k, v, hist_len, n_hist, 0, norm_len, block_m, block_n)


def cached_target_attention_triton(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    k_h: Tensor,
    v_h: Tensor,
    hist_len: Tensor,
    norm_len: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Targets [B, H, M, dh] against cached history K/V [B, H, N, dh] -> [B, H, M, dh].

    Same numbers as `fm.ops.cached_target_attention_reference`.
    """
    n = k_h.shape[2]
    return _launch(q_t, k_h, v_h, k_t, v_t, hist_len, n, n, norm_len, block_m, block_n)
