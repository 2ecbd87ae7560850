"""Offline quality of an expert: Normalized Entropy (NE), the paradigm's yardstick.

NE = mean binary cross-entropy / entropy of the labels' base rate. 1.0 is what always predicting
the base rate scores; lower is better. (The fm package keeps its own copy: the two ship apart.)
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """NE over the rows whose label is not NaN; nan if none or if the labels are all 0 or all 1."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
    keep = ~np.isnan(y)
    y, p = y[keep], np.clip(p[keep], EPS, 1 - EPS)
    if len(y) == 0:
        return float("nan")
    base = y.mean()
    if base <= 0.0 or base >= 1.0:
        return float("nan")
    ce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    base_entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    return float(ce / base_entropy)
