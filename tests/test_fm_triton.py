"""The fused Triton attention kernel against the PyTorch reference, on CPU under TRITON_INTERPRET=1.

The interpreter runs the real kernel (same source, masks and loop bounds) with numpy on CPU
tensors. Triton decides at import/decoration time whether it interprets, and must not have been
imported before without the variable (on a CUDA machine `import fm` imports it to register the
kernel), so the checks run in ONE fresh interpreter process: this file executed as a script with
TRITON_INTERPRET=1 set before anything imports triton. It reports the errors as JSON; the tests
below assert on them. Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fm import ops

ATOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent

# (B, H, N, M, dh, hist_len, block_m, block_n)
SHAPES = [
    (3, 2, 37, 5, 8, [37, 10, 0], 16, 16),  # ragged, one row without history, N not a power of 2
    (1, 1, 1, 1, 4, [1], 16, 16),  # N = 1, M = 1
    (2, 1, 1, 3, 4, [0, 1], 16, 16),  # N = 1 with an empty row
    (2, 3, 20, 0, 6, [3, 20], 16, 16),  # M = 0: history only; dh = 6 padded to 16 lanes
    (2, 2, 5, 1, 12, [0, 5], 16, 16),  # M = 1
    (2, 3, 33, 7, 10, [33, 17], 16, 32),  # several heads, BLOCK_M != BLOCK_N, odd dh
    (1, 2, 0, 4, 8, [0], 16, 16),  # no history slot at all: targets see only themselves
    (4, 2, 19, 9, 16, [19, 1, 18, 7], 32, 16),
]


# ---- the worker: runs in a fresh process with TRITON_INTERPRET=1 -----------------------------


def _qkv(B, H, L, dh, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, dh, generator=g) for _ in range(3))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def _shape_case(tk, B, H, N, M, dh, hist_len, bm, bn) -> dict:
    q, k, v = _qkv(B, H, N + M, dh, seed=N * 7 + M)
    hl = torch.tensor(hist_len)
    want = ops.target_aware_attention_reference(q, k, v, hl, N, N + 1)
    got = tk.target_aware_attention_triton(q, k, v, hl, N, N + 1, block_m=bm, block_n=bn)
    # slices of the joint tensors: non-contiguous views, as the model hands them over
    args = (q[:, :, N:], k[:, :, N:], v[:, :, N:], k[:, :, :N], v[:, :, :N], hl)
    c_want = ops.cached_target_attention_reference(*args, N + 3)
    c_got = tk.cached_target_attention_triton(*args, N + 3, block_m=bm, block_n=bn)
    joint3 = tk.target_aware_attention_triton(q, k, v, hl, N, N + 3, block_m=bm, block_n=bn)
    return {
        "shape": list(got.shape),
        "cached_shape": list(c_got.shape),
        "joint": _err(got, want),
        "cached": _err(c_got, c_want),
        "cached_vs_joint": _err(c_got, joint3[:, :, N:]),
        "ref_scale": float(want.abs().max()) if want.numel() else 0.0,
    }


def _padding_leak(tk) -> dict:
    """Junk (inf, nan) in padded history slots must not reach any valid output."""
    B, H, N, M, dh = 2, 2, 12, 3, 8
    q, k, v = _qkv(B, H, N + M, dh, seed=11)
    hl = torch.tensor([12, 4])
    clean = tk.target_aware_attention_triton(q, k, v, hl, N, 20)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 4:N] = float("inf")
    v2[1, :, 4:N] = float("nan")
    dirty = tk.target_aware_attention_triton(q, k2, v2, hl, N, 20)
    return {
        "row0": _err(dirty[0], clean[0]),
        "row1_history": _err(dirty[1, :, :4], clean[1, :, :4]),
        "row1_targets": _err(dirty[1, :, N:], clean[1, :, N:]),
    }


def _batch_padding(tk) -> dict:
    """A row's targets: same output alone and padded inside a longer batch."""
    H, dh = 2, 8
    q, k, v = _qkv(1, H, 6 + 2, dh, seed=3)  # history 6, 2 targets
    alone = tk.target_aware_attention_triton(q, k, v, torch.tensor([6]), 6, 30)
    pad = torch.randn(1, H, 10, dh)
    big = [torch.cat([x[:, :, :6], pad, x[:, :, 6:]], dim=2) for x in (q, k, v)]
    other = _qkv(1, H, 18, dh, seed=4)
    batch = [torch.cat([b, o]) for b, o in zip(big, other, strict=True)]
    out = tk.target_aware_attention_triton(*batch, torch.tensor([6, 16]), 16, 30)
    return {"err": _err(out[0, :, 16:], alone[0, :, 6:])}


def _model_case(tk) -> dict:
    """The whole encoder with the kernel registered as the CPU backend: joint and cached paths."""
    from fm import FMConfig, FoundationModel
    from fm.batching import Batch

    cfg = FMConfig.small(
        n_items=30,
        surfaces=["a", "b"],
        main_tasks=["click"],
        aux_tasks={},
        n_actions=3,
        max_history=10,
    )
    torch.manual_seed(0)
    model = FoundationModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    B, N, M = 3, 10, 4
    hl = torch.tensor([10, 3, 0])
    valid = torch.arange(N)[None] < hl[:, None]

    def ints(hi, *shape):
        return torch.randint(0, hi, shape, generator=g)

    b = Batch(
        hist_item=ints(30, B, N) * valid,
        hist_surface=ints(2, B, N) * valid,
        hist_hour=ints(24, B, N) * valid,
        hist_action=ints(3, B, N) * valid,
        hist_rank=(hl[:, None] - 1 - torch.arange(N)[None]).clamp(min=0) * valid,
        hist_gap=ints(32, B, N) * valid,
        hist_len=hl,
        tgt_item=ints(30, B, M),
        tgt_surface=ints(2, B, M),
        tgt_hour=ints(24, B, M),
        tgt_gap=ints(32, B),
        tgt_mask=torch.ones(B, M, dtype=torch.bool),
    )
    calls = {"n": 0}
    joint_fn, cached_fn = tk.target_aware_attention_triton, tk.cached_target_attention_triton

    def counting_joint(*a):
        calls["n"] += 1
        return joint_fn(*a)

    def counting_cached(*a):
        calls["n"] += 1
        return cached_fn(*a)

    with torch.no_grad():
        want_joint, want_cached = model(b), model.encode_targets(b, model.encode_history(b))
        ops.register_backend("cpu", counting_joint, counting_cached)
        try:
            got_joint = model(b)
            got_cached = model.encode_targets(b, model.encode_history(b))
        finally:
            ops._BACKENDS.pop("cpu", None)
    return {
        "kernel_calls": calls["n"],
        "joint": _err(got_joint, want_joint),
        "cached": _err(got_cached, want_cached),
        "cached_vs_joint": _err(got_cached, got_joint),
    }


def _worker() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import fm.triton_attention as tk

    return {
        "kernel_type": type(tk._hstu_target_aware_fwd).__name__,
        "shapes": [_shape_case(tk, *s) for s in SHAPES],
        "padding_leak": _padding_leak(tk),
        "batch_padding": _batch_padding(tk),
        "model": _model_case(tk),
    }


# ---- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> dict:
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "FOUNDEX_FM_TRITON": "0",  # the worker registers nothing for cuda by itself
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_interpreter_ran_the_triton_kernel(results):
    assert results["kernel_type"] == "InterpretedFunction"


@pytest.mark.parametrize(
    "i", range(len(SHAPES)), ids=[f"B{s[0]}H{s[1]}N{s[2]}M{s[3]}d{s[4]}" for s in SHAPES]
)
def test_kernel_matches_reference(results, i):
    B, H, N, M, dh, _, _, _ = SHAPES[i]
    r = results["shapes"][i]
    assert r["shape"] == [B, H, N + M, dh]
    assert r["cached_shape"] == [B, H, M, dh]
    assert r["joint"] <= ATOL
    assert r["cached"] <= ATOL
    assert r["cached_vs_joint"] <= ATOL
    assert r["ref_scale"] > 1e-3  # a real comparison, not zeros against zeros


def test_kernel_padding_never_leaks(results):
    assert results["padding_leak"] == {"row0": 0.0, "row1_history": 0.0, "row1_targets": 0.0}


def test_kernel_output_independent_of_batch_padding(results):
    assert results["batch_padding"]["err"] <= ATOL


def test_model_through_the_kernel_backend(results):
    r = results["model"]
    # 2 layers: joint forward (2) + history encode (2) + cached targets (2)
    assert r["kernel_calls"] == 6
    assert r["joint"] <= ATOL and r["cached"] <= ATOL and r["cached_vs_joint"] <= ATOL


def test_backends_serve_inference_only_training_keeps_the_reference():
    """Registered kernels are forward-only: a call that needs gradients uses the reference."""
    used = []

    def joint(q, k, v, hl, n, norm):
        used.append("joint")
        return ops.target_aware_attention_reference(q, k, v, hl, n, norm)

    def cached(*a):
        used.append("cached")
        return ops.cached_target_attention_reference(*a)

    q, k, v = (torch.randn(1, 1, 5, 4, requires_grad=True) for _ in range(3))
    hl = torch.tensor([3])
    ops.register_backend("cpu", joint, cached)
    try:
        out = ops.target_aware_attention(q, k, v, hl, 3, 4)  # grad needed: reference
        out.sum().backward()
        assert used == [] and q.grad is not None and q.grad.abs().sum() > 0
        with torch.no_grad():
            ops.target_aware_attention(q, k, v, hl, 3, 4)
            ops.cached_target_attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], k, v, hl, 4)
        assert used == ["joint", "cached"]
    finally:
        ops._BACKENDS.pop("cpu", None)


def test_reference_stays_the_cpu_path():
    assert "cpu" not in ops._BACKENDS
    if not torch.cuda.is_available():
        assert ops.register_default_backends() is False
        assert "cuda" not in ops._BACKENDS


if __name__ == "__main__":  # the interpreter worker (see the module docstring)
    print(json.dumps(_worker()))
