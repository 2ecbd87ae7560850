"""Offline quality of an expert: Normalized Entropy (NE) and the Transfer Ratio (TR).

NE = mean binary cross-entropy / entropy of the labels' base rate (1.0 = always predicting the
base rate; lower is better). It is the FM's own metric, imported so both sides score alike.
"""

from __future__ import annotations

import math

from fm.metrics import normalized_entropy

__all__ = ["normalized_entropy", "transfer_ratio"]


def transfer_ratio(expert_ne_1: float, expert_ne_2: float, fm_ne_1: float, fm_ne_2: float) -> float:
    """How much of an FM's NE gain from version 1 to 2 reaches the expert:
    TR = (NE(expert on FM1) - NE(expert on FM2)) / (NE(FM1) - NE(FM2)); nan if the FMs tie."""
    fm_gain = fm_ne_1 - fm_ne_2
    if not math.isfinite(fm_gain) or abs(fm_gain) < 1e-12:
        return float("nan")
    return (expert_ne_1 - expert_ne_2) / fm_gain
