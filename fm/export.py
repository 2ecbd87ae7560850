"""Inference pruning: a training checkpoint -> the serving artifact (the TAE path only).

The artifact keeps the encoder (f(), action/position/time embeddings, HSTU layers, output
norm) and any item-content buffer; it drops the task heads, the alignment modules and the
training extras (optimizer state, RNG, NE sums). Serving and logging load it with
`load_checkpoint` like any checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fm.batching import random_batch
from fm.checkpoint import checkpoint_digest, load_checkpoint, save_checkpoint
from fm.model import FoundationModel

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


def _param_count(keys: set[str], state: dict[str, torch.Tensor]) -> int:
    """Parameters among `keys` of a state dict. Buffers (item content) are data, not counted."""
    return sum(state[k].numel() for k in keys if k not in _BUFFERS)


def export_serving(checkpoint: str | Path, out: str | Path, *, verify: bool = True) -> ExportReport:
    """Write the serving artifact of `checkpoint` to `out` (loads and hashes it once).

    verify: reload the artifact and check it gives exactly the checkpoint's TAEs on a random
    request batch. Raises CheckpointError for a file that is not a loadable checkpoint,
    ValueError when `out` is the checkpoint itself or a folder, RuntimeError when the artifact
    does not reproduce the TAEs, OSError when `out` cannot be written (see `write_serving`:
    nothing is left behind then).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if _same_file(checkpoint, out):
        raise ValueError(f"{out} is the checkpoint being exported; write the artifact elsewhere")
    model, extra = load_checkpoint(checkpoint)
    report = write_serving(model, extra, out, source_digest=checkpoint_digest(checkpoint),
                           verify=verify)
    report.checkpoint = str(checkpoint)
    report.bytes_checkpoint = checkpoint.stat().st_size
    return report


def write_serving(
    model: FoundationModel,
    extra: dict[str, Any],
    out: str | Path,
    *,
    source_digest: str,
    verify: bool = True,
) -> ExportReport:
    """Write the serving artifact of an already loaded checkpoint (`model`, `extra` as
    `load_checkpoint` returns them; `source_digest` its file's sha256) to `out`.

    The report's `checkpoint` is "" and `bytes_checkpoint` 0: no file was read here
    (`export_serving` fills them). Raises ValueError when `out` is a folder, RuntimeError
    when `verify` and the reloaded artifact does not reproduce the model's TAEs on a random
    request batch, OSError when it cannot be written.

    The artifact is written and verified under a temporary name beside `out`, then renamed:
    on any failure `out` keeps what it held (if anything) and no temporary file is left.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the artifact's file name")
    keep = {k: extra[k] for k in ("step", "n_requests") if k in extra}
    keep["source_digest"] = source_digest
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_checkpoint(model, tmp, keep, serving=True)
        if verify:
            served, _ = load_checkpoint(tmp)
            cfg = model.config
            n = min(cfg.max_history, 12)
            b = random_batch(cfg, [n, max(n // 2, 1), 0], n_targets=3, seed=0)
            with torch.no_grad():
                if not torch.equal(served(b), model(b)):
                    raise RuntimeError(f"serving artifact {out} does not reproduce the TAEs")
        size, digest = tmp.stat().st_size, checkpoint_digest(tmp)
        os.replace(tmp, out)
    finally:
        # save_checkpoint's own temporary file too, should it fail before its rename
        for leftover in (tmp, tmp.with_name(tmp.name + ".tmp")):
            leftover.unlink(missing_ok=True)

    # The artifact holds exactly the model's state minus the heads (what save_checkpoint
    # writes with serving=True), so both counts come from the model in memory.
    state = model.state_dict()
    keys_srv = {k for k in state if not FoundationModel.is_head_param(k)}
    dropped = sorted({k.split(".")[0] for k in set(state) - keys_srv})
    return ExportReport(
        checkpoint="",
        artifact=str(out),
        params_checkpoint=_param_count(set(state), state),
        params_serving=_param_count(keys_srv, state),
        bytes_checkpoint=0,
        bytes_serving=size,
        dropped=dropped,
        digest=digest,
    )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same
    inode, which also catches hard links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either one missing
        return False


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
