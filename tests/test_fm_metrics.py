"""Normalized Entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fm import normalized_entropy
from fm.metrics import NEAccumulator


def test_base_rate_prediction_is_one():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
    assert normalized_entropy(y, np.full(len(y), 0.25)) == pytest.approx(1.0, abs=1e-12)


def test_known_value():
    y = np.array([1.0, 0.0])
    p = np.array([0.8, 0.4])
    ce = -(math.log(0.8) + math.log(0.6)) / 2
    assert normalized_entropy(y, p) == pytest.approx(ce / math.log(2))


def test_better_predictions_lower_ne_and_nan_labels_are_ignored():
    y = np.array([1, 0, 1, 0, np.nan, np.nan])
    good = np.array([0.9, 0.1, 0.9, 0.1, 0.0, 1.0])  # wild guesses on NaN rows: ignored
    assert normalized_entropy(y, good) < 0.2
    assert normalized_entropy(y, np.full(6, 0.5)) == pytest.approx(1.0)


def test_undefined_cases_are_nan():
    assert math.isnan(normalized_entropy(np.array([]), np.array([])))
    assert math.isnan(normalized_entropy(np.array([np.nan]), np.array([0.3])))
    assert math.isnan(normalized_entropy(np.ones(3), np.full(3, 0.9)))
    assert math.isnan(normalized_entropy(np.zeros(3), np.full(3, 0.1)))


def test_streaming_accumulator_equals_one_shot():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.3).astype(float)
    p = rng.random(1000)
    acc = NEAccumulator()
    for i in range(0, 1000, 128):
        acc.update(y[i : i + 128], p[i : i + 128])
    restored = NEAccumulator.from_state(acc.state())
    assert restored.value() == pytest.approx(normalized_entropy(y, p), rel=1e-12)
