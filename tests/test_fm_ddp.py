"""Data-parallel FM training: 2 real gloo processes under torchrun == 1 process, step for step.

Run as a script (`python -m torch.distributed.run ... tests/test_fm_ddp.py OUT`), this file is
the worker: it trains on the toy log (a fresh pass, then a pass resumed from a single-process
checkpoint) and saves what its rank returned under OUT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fm import FMConfig, FoundationModel, load_checkpoint, train_streaming
from fm.batching import Requests
from fm.distributed import DistContext, global_counts, scaled_task_losses, shard_bounds
from fm.testing import toy_config_kwargs, toy_events

WORLD = 2
CHECKPOINT_EVERY = 3


def _data() -> tuple[object, FMConfig]:
    # 25 requests in global batches of 4: 7 steps, the last one a single request, so rank 0's
    # slice of it is empty. Two requests per rank per step: often one surface only, so a rank
    # regularly has no valid sample of the other surface's auxiliary task.
    events = toy_events(n_users=12, n_items=30, n_requests=25, n_candidates=3, seed=3)
    config = FMConfig(
        **toy_config_kwargs(30), d_model=16, n_layers=1, n_heads=2, max_history=8,
        batch_requests=4,
    )
    return events, config


def _train(checkpoint_dir: Path, progress: bool):
    events, config = _data()
    return train_streaming(
        events, config, checkpoint_dir=checkpoint_dir, checkpoint_every=CHECKPOINT_EVERY,
        progress=progress,
    )


def _worker(out: Path) -> None:
    import torch.distributed as dist

    res = _train(out / "ckpt", progress=True)
    assert dist.is_initialized()
    # the second pass reuses the process group and resumes after a 1-process run's step 3
    resumed = _train(out / "resume", progress=False)
    torch.save(
        {
            "world": dist.get_world_size(),
            "state": res.model.state_dict(),
            "ne": res.ne,
            "steps": res.steps,
            "checkpoints": [p.name for p in res.checkpoints],
            "resumed_state": resumed.model.state_dict(),
            "resumed_ne": resumed.ne,
        },
        out / f"rank{dist.get_rank()}.pt",
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """(out folder, per-rank results, per-rank stderr) of one torchrun job of WORLD workers."""
    out = tmp_path_factory.mktemp("ddp")
    events, config = _data()
    train_streaming(  # what the workers' second pass resumes from
        events, config, checkpoint_dir=out / "resume", checkpoint_every=CHECKPOINT_EVERY,
        max_steps=CHECKPOINT_EVERY, progress=False,
    )
    logs = out / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", f"--log-dir={logs}", "--redirects=3",
        str(Path(__file__).resolve()), str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    stderr = {r: next(logs.rglob(f"attempt_0/{r}/stderr.log")).read_text() for r in range(WORLD)}
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(stderr.values())[-3000:]
    results = {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)}
    return out, results, stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The same pass in this process: no torchrun environment, plain training."""
    assert "RANK" not in os.environ
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    return ckpt, _train(ckpt, progress=False)


def test_two_processes_give_the_weights_of_one(ddp_run, single_run):
    _, results, _ = ddp_run
    _, single = single_run
    events, config = _data()
    assert single.steps == 7
    for r, res in results.items():
        assert res["world"] == WORLD and res["steps"] == single.steps, r
    want = single.model.state_dict()
    torch.manual_seed(config.seed)
    init = FoundationModel(config).state_dict()  # the weights both runs started from
    assert max((want[k] - init[k]).abs().max().item() for k in want) > 1e-3  # it did train
    for name, w in want.items():
        assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name
        torch.testing.assert_close(results[0]["state"][name], w, atol=1e-5, rtol=0, msg=name)


def test_progressive_ne_is_global(ddp_run, single_run):
    _, results, _ = ddp_run
    _, single = single_run
    for res in results.values():
        assert set(res["ne"]) == set(single.ne)
        for task, ne in single.ne.items():
            assert res["ne"][task] == pytest.approx(ne, rel=1e-5), task


def test_only_rank_zero_writes_checkpoints_and_progress(ddp_run, single_run):
    out, results, stderr = ddp_run
    single_dir, single = single_run
    names = ["step_00000003.pt", "step_00000006.pt", "step_00000007.pt"]
    assert results[0]["checkpoints"] == names and results[1]["checkpoints"] == []
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == names
    assert "fm train" in stderr[0] and "fm train" not in stderr[1]

    # rank 0's last checkpoint holds the final weights and the global NE sums of the pass
    model, extra = load_checkpoint(out / "ckpt" / names[-1])
    _, want = load_checkpoint(single_dir / names[-1])
    for name, w in model.state_dict().items():
        assert torch.equal(w, results[0]["state"][name]), name
    for task, s in want["ne_state"].items():
        assert extra["ne_state"][task] == pytest.approx(s, rel=1e-6), task


def test_resume_across_process_counts(ddp_run, single_run, tmp_path):
    """1 process -> 2 (the workers' second pass) and 2 -> 1 continue the same run."""
    out, results, _ = ddp_run
    _, single = single_run
    shutil.copy(out / "ckpt" / "step_00000006.pt", tmp_path / "step_00000006.pt")
    back = _train(tmp_path, progress=False)  # step 7 alone, in this process
    for state, ne in [
        (results[0]["resumed_state"], results[0]["resumed_ne"]),
        (results[1]["resumed_state"], results[1]["resumed_ne"]),
        (back.model.state_dict(), back.ne),
    ]:
        for name, w in single.model.state_dict().items():
            torch.testing.assert_close(state[name], w, atol=1e-5, rtol=0, msg=name)
        for task, want in single.ne.items():
            assert ne[task] == pytest.approx(want, rel=1e-5), task


def test_the_run_covers_empty_slices():
    """The cases the global mean is for do occur in the run above: a rank with no valid
    sample of a task that the global batch has, and a rank with no request at all."""
    events, config = _data()
    reqs = Requests.from_events(events, config)
    bs, n = config.batch_requests, len(reqs)
    task_without_rows, empty_slice = False, False
    for step in range(-(-n // bs)):
        per_rank = []
        for r in range(WORLD):
            a, b = shard_bounds(step * bs, min((step + 1) * bs, n), r, WORLD)
            empty_slice |= a == b
            labels = reqs.labels[reqs.offsets[a] : reqs.offsets[b]]  # [rows, T]
            per_rank.append((~np.isnan(labels)).sum(axis=0))
        per_rank = np.array(per_rank)  # [WORLD, T]
        task_without_rows |= bool(((per_rank == 0) & (per_rank.sum(axis=0) > 0)).any())
    assert task_without_rows and empty_slice


def test_global_masked_mean_with_a_shard_lacking_a_task():
    """Two shards, one with no valid 'complete' sample: the DDP-averaged gradient of the
    scaled per-rank losses equals the single-process gradient of the per-task means."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(11, generator=g, requires_grad=True)  # one logit per sample
    y = (torch.rand(11, generator=g) < 0.4).float()
    # sample indices of each task on each shard; shard 0 has no 'complete' sample
    shards = [{"click": [0, 1, 2], "complete": []}, {"click": [3, 4], "complete": [5, 6, 7]}]

    def outputs(idx: dict[str, list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: (theta[torch.tensor(i, dtype=torch.long)], y[i]) for t, i in idx.items()}

    single = outputs({t: [i for s in shards for i in s[t]] for t in ("click", "complete")})
    ref = sum(F.binary_cross_entropy_with_logits(lg, lb) for lg, lb in single.values())
    (ref_grad,) = torch.autograd.grad(ref, theta)

    one = DistContext()  # counts of each shard on its own; their sum is what all-reduce gives
    tasks = ("click", "complete")
    counts = {t: sum(global_counts(outputs(s), one)[t] for s in shards) for t in tasks}
    assert counts == {"click": 5, "complete": 3}
    losses = [sum(scaled_task_losses(outputs(s), counts, WORLD).values()) for s in shards]
    grads = [torch.autograd.grad(loss, theta)[0] for loss in losses]
    torch.testing.assert_close(sum(losses) / WORLD, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sum(grads) / WORLD, ref_grad, atol=1e-6, rtol=0)

    # a mean of per-rank means (the mistake this guards against) gives another gradient
    def naive(s: dict[str, list[int]]) -> torch.Tensor:
        return sum(
            F.binary_cross_entropy_with_logits(lg, lb) if lb.numel() else lg.sum() * 0.0
            for lg, lb in outputs(s).values()
        )

    naive_grad = sum(torch.autograd.grad(naive(s), theta)[0] for s in shards) / WORLD
    assert (naive_grad - ref_grad).abs().max() > 1e-3


@pytest.mark.parametrize("n", [0, 1, 2, 5, 64])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_bounds_split_a_batch(n, world):
    bounds = [shard_bounds(10, 10 + n, r, world) for r in range(world)]
    assert bounds[0][0] == 10 and bounds[-1][1] == 10 + n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


def test_single_process_ignores_a_missing_torchrun_environment():
    """Without torchrun's variables there is no process group: nothing to join, no error."""
    import torch.distributed as dist

    events, config = _data()
    res = train_streaming(events, config, max_steps=1, progress=False)
    assert res.steps == 1 and not dist.is_initialized()


def test_batch_smaller_than_world_is_refused(monkeypatch):
    events, config = _data()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="batch_requests=4 is smaller than the 8"):
        train_streaming(events, config, max_steps=1, progress=False)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
