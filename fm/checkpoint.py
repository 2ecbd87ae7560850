"""Checkpoints: config + weights (+ training extras) in one torch.save file.

Contents are plain dicts/tensors/str/int/float/lists, so `torch.load(weights_only=True)` reads
them. Same contents give the same bytes, so a published checkpoint's sha256 (`checkpoint_digest`) identifies the FM version's weights.
`serving=True` writes the pruned serving artifact: only what computing a TAE needs.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fm.config import FMConfig
from fm.model import FoundationModel

FORMAT = "foundex-fm/1"


class CheckpointError(ValueError):
    """A file that is not a loadable foundex checkpoint; the one-line message names it."""


def save_checkpoint(
    model: FoundationModel,
    path: str | Path,
    extra: dict[str, Any] | None = None,
    *,
    serving: bool = False,
) -> Path:
    """Write atomically (tmp + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if not (serving and FoundationModel.is_head_param(k))
    }
    payload = {
        "format": FORMAT,
        "serving": serving,
        "config": model.config.to_dict(),
        "state_dict": state,
        "extra": extra or {},
    }
    # Serialise in memory: torch.save names the archive after the file, so writing to the path
    # directly would make the bytes (and the digest) depend on the file name.
    buf = io.BytesIO()
    torch.save(payload, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[FoundationModel, dict[str, Any]]:
    """-> (model in eval mode, extra). Serving artifacts load without heads.

    Only tensors and plain data are ever unpickled (`weights_only=True`). Raises
    CheckpointError (a ValueError, one line naming `path`) for anything else: not a PyTorch
    archive, a damaged one, one holding other Python objects, another format, a config or
    weights that do not fit.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint: not a PyTorch archive")
    try:
        with warnings.catch_warnings():  # torch warns about foreign files before failing
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading with weights_only=False, which runs
        # arbitrary code from the file: never pass that advice on.
        raise CheckpointError(
            f"{path} is not a {FORMAT} checkpoint: it holds Python objects other than tensors "
            "and plain data, which foundex does not load"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError):
        raise CheckpointError(
            f"{path} is not a {FORMAT} checkpoint: a damaged or truncated PyTorch archive"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    try:
        config = FMConfig.from_dict(payload["config"])
        # A serving artifact builds the TAE path only: no task heads, no alignment modules.
        model = FoundationModel(config, with_heads=not payload["serving"])
        missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: config or weights do not fit the model: {reason}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint/model mismatch: {len(missing)} weights missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.eval()
    return model, payload.get("extra", {})


def checkpoint_digest(path: str | Path) -> str:
    """sha256 hex of the checkpoint file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
