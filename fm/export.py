"""Inference pruning: a training checkpoint -> the serving artifact (the TAE path only).

The artifact keeps the encoder (f(), action/position/time embeddings, HSTU layers, output
norm) and any item-content buffer; it drops the task heads, the alignment modules and the
training extras (optimizer state, RNG, NE sums). Serving and logging load it with
`load_checkpoint` like any checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fm.checkpoint import checkpoint_digest, load_checkpoint, save_checkpoint
from fm.testing import random_batch

_BUFFERS = {"embed.content"}


@dataclass
class ExportReport:
    checkpoint: str
    artifact: str
    params_checkpoint: int  # parameters held by the input checkpoint
    params_serving: int  # parameters held by the serving artifact
    bytes_checkpoint: int  # file sizes
    bytes_serving: int
    dropped: list[str]  # top-level modules left out (heads, alignment modules)
    digest: str  # sha256 of the artifact

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _param_count(path: Path) -> tuple[int, set[str]]:
    """(parameters in the file's state dict, its keys). Buffers (item content) are data."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return sum(v.numel() for k, v in state.items() if k not in _BUFFERS), set(state)


def export_serving(checkpoint: str | Path, out: str | Path, *, verify: bool = True) -> ExportReport:
    """Write the serving artifact of `checkpoint` to `out`.

    verify: reload the artifact and check it gives exactly the checkpoint's TAEs on a random
    request batch.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    model, extra = load_checkpoint(checkpoint)
    keep = {k: extra[k] for k in ("step", "n_requests") if k in extra}
    keep["source_digest"] = checkpoint_digest(checkpoint)
    save_checkpoint(model, out, keep, serving=True)

    if verify:
        served, _ = load_checkpoint(out)
        cfg = model.config
        n = min(cfg.max_history, 12)
        b = random_batch(cfg, [n, max(n // 2, 1), 0], n_targets=3, seed=0)
        with torch.no_grad():
            if not torch.equal(served(b), model(b)):
                raise RuntimeError(f"serving artifact {out} does not reproduce the TAEs")

    p_ckpt, keys_ckpt = _param_count(checkpoint)
    p_srv, keys_srv = _param_count(out)
    dropped = sorted({k.split(".")[0] for k in keys_ckpt - keys_srv})
    return ExportReport(
        checkpoint=str(checkpoint),
        artifact=str(out),
        params_checkpoint=p_ckpt,
        params_serving=p_srv,
        bytes_checkpoint=checkpoint.stat().st_size,
        bytes_serving=out.stat().st_size,
        dropped=dropped,
        digest=checkpoint_digest(out),
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_export_report(r: ExportReport) -> str:
    """A small table: parameters and file size of the checkpoint and of the artifact."""
    rows = [
        ("", "parameters", "file size", "path"),
        ("checkpoint", f"{r.params_checkpoint:,}", _size(r.bytes_checkpoint), r.checkpoint),
        ("serving", f"{r.params_serving:,}", _size(r.bytes_serving), r.artifact),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    lines.append(f"dropped: {', '.join(r.dropped) or 'nothing'}; artifact sha256 {r.digest[:12]}")
    return "\n".join(lines)
