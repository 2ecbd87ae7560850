"""The compiled Triton kernel on a real GPU (skipped without CUDA): parity with the reference."""

from __future__ import annotations

import pytest
import torch

from fm import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "B,H,N,M,dh", [(4, 4, 1000, 100, 16), (3, 2, 257, 1, 32), (2, 2, 64, 0, 16)]
)
def test_compiled_kernel_matches_reference_on_gpu(B, H, N, M, dh):
    from fm import triton_attention as tk

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N + M, dh, device="cuda") for _ in range(3))
    hl = torch.randint(0, N + 1, (B,), device="cuda")
    hl[0] = N
    want = ops.target_aware_attention_reference(q, k, v, hl, N, N + 1)
    got = tk.target_aware_attention_triton(q, k, v, hl, N, N + 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    args = (q[:, :, N:], k[:, :, N:], v[:, :, N:], k[:, :, :N], v[:, :, :N], hl)
    torch.testing.assert_close(
        tk.cached_target_attention_triton(*args, N + 1),
        ops.cached_target_attention_reference(*args, N + 1),
        atol=1e-4,
        rtol=1e-4,
    )
    # the dispatch point picks the kernel for CUDA tensors
    assert ops._BACKENDS["cuda"][0] is tk.target_aware_attention_triton
