"""`foundex fm export` (the pruned serving artifact) and `foundex bench fm` (TAE throughput)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fm import FMConfig, FoundationModel, load_checkpoint, save_checkpoint
from fm import bench as fm_bench
from fm.export import export_serving, format_export_report
from fm.testing import random_batch, toy_config_kwargs


@pytest.fixture
def checkpoint(tmp_path):
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=12, content_dim=3)
    torch.manual_seed(0)
    model = FoundationModel(cfg, torch.randn(40, 3))
    opt = torch.optim.AdamW(model.parameters())
    b = random_batch(cfg, [12, 5], 3, seed=1)
    model(b).sum().backward()
    opt.step()  # an optimizer state worth dropping
    extra = {"step": 7, "optimizer": opt.state_dict(), "rng_state": torch.get_rng_state()}
    return save_checkpoint(model, tmp_path / "step_7.pt", extra), model


def test_export_keeps_only_the_tae_path(checkpoint, tmp_path):
    path, model = checkpoint
    report = export_serving(path, tmp_path / "out" / "serving.pt")
    heads = sum(p.numel() for n, p in model.named_parameters() if FoundationModel.is_head_param(n))
    total = sum(p.numel() for p in model.parameters())
    assert report.params_checkpoint == total
    assert report.params_serving == total - heads and heads > 0
    assert report.bytes_serving < report.bytes_checkpoint / 2  # no optimizer state either
    assert report.dropped == ["aux_heads", "main_head"]

    payload = torch.load(report.artifact, weights_only=True)
    assert payload["serving"] is True
    assert not any(FoundationModel.is_head_param(k) for k in payload["state_dict"])
    assert "embed.content" in payload["state_dict"]  # the item content is part of f()
    assert payload["extra"]["step"] == 7 and "optimizer" not in payload["extra"]
    assert len(payload["extra"]["source_digest"]) == 64

    served, _ = load_checkpoint(report.artifact)
    b = random_batch(model.config, [12, 1, 0], 4, seed=5)
    with torch.no_grad():
        assert torch.equal(served(b), model.eval()(b))
        assert torch.equal(
            served.encode_targets(b, served.encode_history(b)),
            model.encode_targets(b, model.encode_history(b)),
        )

    table = format_export_report(report)
    assert f"{report.params_serving:,}" in table and f"{report.params_checkpoint:,}" in table
    # exporting an artifact again is harmless: nothing more to drop
    again = export_serving(report.artifact, tmp_path / "again.pt")
    assert again.params_serving == again.params_checkpoint == report.params_serving
    assert again.dropped == []


def test_cli_fm_export(checkpoint, tmp_path):
    from api.cli import app

    path, _ = checkpoint
    out = tmp_path / "serving.pt"
    res = CliRunner().invoke(app, ["fm", "export", str(path), str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    lines = res.output.splitlines()
    assert lines[1].startswith("checkpoint") and lines[2].startswith("serving")
    assert "main_head" in res.output and "KiB" in res.output
    missing = CliRunner().invoke(app, ["fm", "export", str(tmp_path / "nope.pt"), str(out)])
    assert missing.exit_code == 2


SMALL = {
    "ms": (1, 5),
    "ns": (8, 13),
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "repeats": 1,
    "min_seconds": 0.0,
}


def test_bench_fm_small_grid():
    result = fm_bench.bench_fm(say=lambda s: None, naive_max=3, **SMALL)
    rows = result["rows"]
    assert [(r["n"], r["m"]) for r in rows] == [(8, 1), (8, 5), (13, 1), (13, 5)]
    for r in rows:
        assert r["max_abs_diff"] <= fm_bench.TOL
        for key in ("cached_cps", "warm_cps", "joint_cps", "naive_cps"):
            assert r[key] > 0
        assert r["naive_timed_candidates"] == min(r["m"], 3)
        assert r["speedup_cached_vs_naive"] == pytest.approx(
            r["cached_cps"] / r["naive_cps"], rel=0.02, abs=0.01
        )  # (figures are rounded: speedups to 0.01)
    assert "target" not in result  # (1024, 512) not in this grid
    json.dumps(result)


def test_bench_fm_refuses_paths_that_disagree(monkeypatch):
    real = fm_bench.bench_model

    def broken(*a, **kw):
        model = real(*a, **kw)
        forward = model.forward
        model.forward = lambda b: forward(b) + 1e-3  # the joint / naive path drifts
        return model

    monkeypatch.setattr(fm_bench, "bench_model", broken)
    with pytest.raises(AssertionError, match="paths disagree"):
        fm_bench.bench_fm(say=lambda s: None, **SMALL)


def test_cli_bench_fm_last_line_is_json():
    from api.cli import app

    args = [
        "bench",
        "fm",
        "--ms",
        "1,4",
        "--ns",
        "6",
        "--repeats",
        "1",
        "--naive-max",
        "0",
        "--d-model",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    last = json.loads(lines[-1])
    assert [r["m"] for r in last["rows"]] == [1, 4]
    assert last["rows"][1]["naive_timed_candidates"] == 4
    assert any(line.split()[:2] == ["6", "4"] for line in lines[:-1])  # the table row
