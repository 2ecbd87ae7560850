"""Training, scoring, evaluation and the saved artifact of an expert.

An expert trains on its point-in-time ExpertFrame: AdamW, binary cross-entropy per task over
that task's valid (non-NaN) labels only, seeded so the same frame gives the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from experts.config import ExpertConfig
from experts.dataset import batch_inputs, label_matrix, to_tensors
from experts.metrics import normalized_entropy
from experts.model import ExpertModel
from fm.metrics import base_rate_logit

ARTIFACT_FORMAT = 1
PREDICT_BATCH = 8192
# Experts are tiny: intra-op threads buy little, and on a busy 2-core machine OpenMP's
# spin-waiting made a training step ~5x slower with 2 threads than with 1 (measured).
TRAIN_THREADS = 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` intra-op threads, restoring the caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of each task's BCE averaged over its valid labels (tasks with none skip)."""
    valid = ~torch.isnan(labels)
    per_row = F.binary_cross_entropy_with_logits(
        logits, torch.where(valid, labels, 0.0), reduction="none"
    )
    counts = valid.sum(dim=0)
    per_task = (per_row * valid).sum(dim=0) / counts.clamp(min=1)
    has = counts > 0
    if not has.any():
        return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    return per_task[has].mean()


def train_expert(
    cfg: ExpertConfig,
    frame: pd.DataFrame,
    *,
    n_items: int,
    n_categories: int,
    n_actions: int,
    tae_dim: int | None,
    progress: bool = True,
) -> ExpertModel:
    """Train a fresh expert on `frame` (which needs recent history and task labels)."""
    tensors = to_tensors(frame, cfg, tae_dim)
    if "labels" not in tensors or not (~torch.isnan(tensors["labels"])).any():
        raise ValueError(f"expert {cfg.name!r}: the frame has no valid labels for {cfg.tasks}")
    labels = tensors["labels"]
    n = len(frame)
    # A private RNG stream: seeding must not disturb (or depend on) the caller's global state.
    with torch.random.fork_rng(devices=[]), torch_threads(TRAIN_THREADS):
        torch.manual_seed(cfg.seed)
        model = ExpertModel(cfg, tae_dim, n_items, n_categories, n_actions)
        _init_bias_to_base_rate(model, labels)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        shuffle = torch.Generator().manual_seed(cfg.seed)
        steps = cfg.epochs * -(-n // cfg.batch_size)
        bar = tqdm(total=steps, desc=f"expert {cfg.name}", disable=not progress, leave=False)
        model.train()
        for _ in range(cfg.epochs):
            for idx in torch.randperm(n, generator=shuffle).split(cfg.batch_size):
                loss = masked_bce(model(**batch_inputs(tensors, idx)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
    model.eval()
    return model


@torch.no_grad()
def _init_bias_to_base_rate(model: ExpertModel, labels: torch.Tensor) -> None:
    """Start each task head at the logit of its base rate. Short runs on tasks with 0.1%
    positives otherwise spend their steps walking the bias from 0 to about -7, and their NE
    says more about that walk than about the features."""
    for j, head in enumerate(model.heads):
        if (b := base_rate_logit(labels[:, j].cpu().numpy())) is not None:
            head.bias.fill_(b)


@torch.no_grad()
def predict(model: ExpertModel, frame: pd.DataFrame) -> np.ndarray:
    """Probabilities [n, T] in the order of the model's tasks; label columns are not needed."""
    model.eval()
    tensors = to_tensors(frame, model.cfg, model.tae_dim)
    tensors.pop("labels", None)
    out = np.empty((len(frame), len(model.cfg.tasks)), dtype=np.float32)
    for start in range(0, len(frame), PREDICT_BATCH):
        rows = slice(start, start + PREDICT_BATCH)
        out[rows] = torch.sigmoid(model(**batch_inputs(tensors, rows))).numpy()
    return out


def evaluate(model: ExpertModel, frame: pd.DataFrame) -> dict[str, float]:
    """NE per task on the rows where that task's label is valid (nan if none)."""
    with torch_threads(TRAIN_THREADS):  # an offline job, like training
        probs = predict(model, frame)
    labels = label_matrix(frame, model.cfg.tasks)
    return {t: normalized_entropy(labels[:, j], probs[:, j]) for j, t in enumerate(model.cfg.tasks)}


def save_expert(model: ExpertModel, cfg: ExpertConfig, path: Path) -> Path:
    """One file: the config (JSON), the table sizes and the weights; loads with weights_only."""
    if cfg != model.cfg:
        raise ValueError(f"config {cfg.name!r} is not the one model {model.cfg.name!r} has")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": ARTIFACT_FORMAT,
            "config": cfg.model_dump_json(),
            "dims": {
                "tae_dim": model.tae_dim,
                "n_items": model.n_items,
                "n_categories": model.n_categories,
                "n_actions": model.n_actions,
            },
            "state_dict": model.state_dict(),
        },
        path,
    )
    return path


def load_expert(path: Path) -> ExpertModel:
    """Rebuild a saved expert, in eval mode, on the CPU."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if blob.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: unknown expert artifact format {blob.get('format')!r}")
    cfg = ExpertConfig.model_validate_json(blob["config"])
    model = ExpertModel(cfg, **blob["dims"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model
