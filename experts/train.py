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
from store_bridge.events.schema import EVENT_TIMESTAMP, timestamps_us

ARTIFACT_FORMAT = 1
PREDICT_BATCH = 8192
# Experts are tiny: intra-op threads buy little, and on a busy 2-core machine OpenMP's
# spin-waiting made a training step ~5x slower with 2 threads than with 1 (measured).
TRAIN_THREADS = 1
MIN_HELD_OUT = 100  # early stopping on fewer held-out rows would follow noise: train on all


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
    """Train a fresh expert on `frame` (which needs recent history and task labels).

    With `cfg.holdout_frac` > 0 the latest rows by `event_timestamp` (that fraction of them,
    at least MIN_HELD_OUT; see `_split_holdout`) are held out for early stopping (see
    ExpertConfig). Raises ValueError when the frame has no valid labels, or when the rows left
    for training after the held-out slice have none.
    """
    tensors = to_tensors(frame, cfg, tae_dim)
    if "labels" not in tensors or not (~torch.isnan(tensors["labels"])).any():
        raise ValueError(f"expert {cfg.name!r}: the frame has no valid labels for {cfg.tasks}")
    labels = tensors["labels"]
    fit_rows, held_rows = _split_holdout(frame, labels, cfg.holdout_frac)
    if not (~torch.isnan(labels[fit_rows])).any():
        raise ValueError(f"expert {cfg.name!r}: no valid labels left for training after holding "
                         f"out the latest {cfg.holdout_frac:.0%} of {len(frame)} rows")
    n = len(fit_rows)
    # A private RNG stream: seeding must not disturb (or depend on) the caller's global state.
    with torch.random.fork_rng(devices=[]), torch_threads(TRAIN_THREADS):
        torch.manual_seed(cfg.seed)
        model = ExpertModel(cfg, tae_dim, n_items, n_categories, n_actions)
        _init_bias_to_base_rate(model, labels[fit_rows])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        shuffle = torch.Generator().manual_seed(cfg.seed)
        steps = cfg.epochs * -(-n // cfg.batch_size)
        bar = tqdm(total=steps, desc=f"expert {cfg.name}", disable=not progress, leave=False)
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for _ in range(cfg.epochs):
            model.train()
            for idx in fit_rows[torch.randperm(n, generator=shuffle)].split(cfg.batch_size):
                loss = masked_bce(model(**batch_inputs(tensors, idx)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if len(held_rows):
                held = _held_out_loss(model, tensors, held_rows)
                if best is not None and not held < best[0]:  # a NaN loss is no improvement
                    break
                best = (held, {k: v.clone() for k, v in model.state_dict().items()})
        bar.close()
        if best is not None:
            model.load_state_dict(best[1])
    model.eval()
    return model


def _split_holdout(frame: pd.DataFrame, labels: torch.Tensor, frac: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions (training rows in the frame's order, held-out rows): the held-out ones
    are the latest int(frac * n) by event time (the frame's last rows without an
    event_timestamp column), widened back to the start of the instant at the cut so that no
    instant is split. None are held out when frac is 0, when fewer than MIN_HELD_OUT rows would
    be (too noisy to stop on) or when the held-out rows have no valid label."""
    n = len(frame)
    everything, nothing = torch.arange(n), torch.zeros(0, dtype=torch.int64)
    n_held = int(frac * n)
    if n_held < MIN_HELD_OUT:
        return everything, nothing
    if EVENT_TIMESTAMP in frame.columns:
        ts = timestamps_us(frame[EVENT_TIMESTAMP])
        order = np.argsort(ts, kind="stable")
        cut = n - n_held
        while cut > 0 and ts[order[cut - 1]] == ts[order[cut]]:
            cut -= 1
    else:
        order, cut = np.arange(n), n - n_held
    held = torch.from_numpy(np.sort(order[cut:]).astype(np.int64))
    if cut == 0 or torch.isnan(labels[held]).all():
        return everything, nothing
    return torch.from_numpy(np.sort(order[:cut]).astype(np.int64)), held


@torch.no_grad()
def _held_out_loss(model: ExpertModel, tensors: dict[str, torch.Tensor], rows: torch.Tensor
                   ) -> float:
    """masked_bce over the held-out rows (tasks without labels there are skipped)."""
    model.eval()
    logits = torch.cat([model(**batch_inputs(tensors, idx)) for idx in rows.split(PREDICT_BATCH)])
    return float(masked_bce(logits, tensors["labels"][rows]))


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
