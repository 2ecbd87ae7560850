"""Normalized Entropy: known values."""

from __future__ import annotations

import math

import numpy as np

from experts import normalized_entropy


def test_base_rate_predictor_scores_one():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.3).astype(np.float32)
    assert math.isclose(normalized_entropy(y, np.full(1000, y.mean())), 1.0, rel_tol=1e-9)


def test_perfect_predictor_scores_about_zero():
    y = np.array([0, 1, 1, 0, 1], dtype=np.float32)
    assert normalized_entropy(y, y) < 1e-5


def test_known_value_and_nan_labels_ignored():
    y = np.array([1, 0, np.nan, 1, 0], dtype=np.float32)
    p = np.array([0.8, 0.4, 0.99, 0.6, 0.1])
    ce = -np.mean([np.log(0.8), np.log(0.6), np.log(0.6), np.log(0.9)])
    assert math.isclose(normalized_entropy(y, p), ce / np.log(2), rel_tol=1e-9)


def test_undefined_cases_are_nan():
    assert math.isnan(normalized_entropy(np.array([np.nan, np.nan]), np.array([0.5, 0.5])))
    assert math.isnan(normalized_entropy(np.array([1.0, 1.0]), np.array([0.5, 0.5])))
    assert math.isnan(normalized_entropy(np.array([0.0, 0.0]), np.array([0.5, 0.5])))
    assert math.isnan(normalized_entropy(np.array([]), np.array([])))


def test_extreme_probabilities_are_clipped():
    assert math.isfinite(normalized_entropy(np.array([1.0, 0.0]), np.array([0.0, 1.0])))


def test_transfer_ratio():
    from experts.metrics import transfer_ratio

    assert math.isclose(transfer_ratio(0.90, 0.88, 0.80, 0.76), 0.5)
    assert math.isclose(transfer_ratio(0.90, 0.86, 0.80, 0.76), 1.0)
    assert math.isnan(transfer_ratio(0.9, 0.8, 0.7, 0.7))
