"""Normalized Entropy (NE): mean log loss divided by the entropy of the labels' base rate.

NE = 1 for a model that always predicts the base rate; lower is better. As in torchrec,
predictions are clipped away from 0 and 1 before taking logs.
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-12


def _entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def base_rate_logit(labels: np.ndarray) -> float | None:
    """log(p / (1 - p)) of the positive rate p of 0/1 `labels` (NaN = no label), p clipped to
    [1e-4, 1 - 1e-4]; None without a labelled row. The starting bias of a task head, so that
    training begins at the base rate (NE 1) rather than at p = 0.5."""
    y = labels[~np.isnan(labels)]
    if not len(y):
        return None
    p = min(max(float(y.mean()), 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """NE of probs against 0/1 labels; NaN labels are ignored. nan if undefined."""
    acc = NEAccumulator()
    acc.update(labels, probs)
    return acc.value()


class NEAccumulator:
    """Streaming NE: sums only, so a pass over many batches needs no stored predictions."""

    def __init__(self, n: float = 0.0, pos: float = 0.0, ce: float = 0.0) -> None:
        self.n, self.pos, self.ce = n, pos, ce

    def update(self, labels: np.ndarray, probs: np.ndarray) -> None:
        y = np.asarray(labels, dtype=np.float64).ravel()
        p = np.asarray(probs, dtype=np.float64).ravel()
        ok = ~np.isnan(y)
        y, p = y[ok], np.clip(p[ok], _EPS, 1 - _EPS)
        self.n += len(y)
        self.pos += float(y.sum())
        self.ce += float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())

    def value(self) -> float:
        if self.n == 0:
            return float("nan")
        base = self.pos / self.n
        if base <= 0.0 or base >= 1.0:
            return float("nan")
        return (self.ce / self.n) / _entropy(base)

    def state(self) -> dict[str, float]:
        return {"n": self.n, "pos": self.pos, "ce": self.ce}

    @classmethod
    def from_state(cls, s: dict[str, float]) -> NEAccumulator:
        return cls(float(s["n"]), float(s["pos"]), float(s["ce"]))
