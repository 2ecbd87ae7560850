"""Tests for the synthetic event generator and its parquet round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store_bridge.events.files import read_dataset, write_dataset
from store_bridge.events.schema import EVENT_TIMESTAMP, KEY_COLUMNS, validate_events
from store_bridge.events.synthetic import ACTION_BITS, SyntheticConfig, generate

SMALL = SyntheticConfig(n_users=100, days=7)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


@pytest.fixture(scope="module")
def longer():
    # Long enough to separate "old" history (> 7 days before) from the evaluation window.
    return generate(SyntheticConfig(n_users=300, days=21, seed=3))


def test_deterministic_for_a_seed(small):
    events, items, spec = small
    events2, items2, spec2 = generate(SMALL)
    pd.testing.assert_frame_equal(events, events2)
    pd.testing.assert_frame_equal(items, items2)
    assert spec == spec2

    other, _, _ = generate(SyntheticConfig(n_users=100, days=7, seed=1))
    assert len(other) != len(events) or not other.equals(events)


def test_dtypes_and_spec(small):
    events, items, spec = small
    validate_events(events, spec)
    assert str(events[EVENT_TIMESTAMP].dtype) == "datetime64[us, UTC]"
    expected = {
        "request_id": "int64",
        "user_id": "int64",
        "item_id": "int64",
        "hour": "int8",
        "action": "int16",
    }
    for col, dtype in expected.items():
        assert str(events[col].dtype) == dtype, col
    for task in spec.all_tasks:
        assert events[task].dtype == np.float32, task
    assert list(events.columns) == KEY_COLUMNS + spec.all_tasks

    assert str(items[EVENT_TIMESTAMP].dtype) == "datetime64[us, UTC]"
    assert (items[EVENT_TIMESTAMP] == pd.Timestamp(SMALL.start, tz="UTC")).all()
    assert items["item_id"].tolist() == list(range(SMALL.n_items))
    assert str(items["category"].dtype) == "int64"
    assert items["quality"].dtype == np.float32
    assert items["category"].between(0, SMALL.n_categories - 1).all()

    assert spec.n_users == SMALL.n_users and spec.n_items == SMALL.n_items
    assert set(spec.main_tasks) <= set.intersection(*map(set, spec.surface_tasks.values()))
    assert spec.unseen_tasks and not set(spec.unseen_tasks) & set(spec.main_tasks)
    assert events["user_id"].between(0, SMALL.n_users - 1).all()
    assert events["item_id"].between(0, SMALL.n_items - 1).all()
    assert events["hour"].between(0, 23).all()
    assert (events["hour"] == events[EVENT_TIMESTAMP].dt.hour).all()


def test_labels_nan_exactly_outside_the_surface(small):
    events, _, spec = small
    for task in spec.all_tasks:
        valid = events["surface"].map(lambda s, t=task: t in spec.surface_tasks[s])
        assert events.loc[valid, task].notna().all(), task
        assert events.loc[~valid, task].isna().all(), task
        assert events.loc[valid, task].isin([0.0, 1.0]).all(), task
    # Every surface appears, and each surface-specific task has valid rows.
    assert set(events["surface"]) == set(spec.surfaces)


def test_action_never_encodes_the_unseen_task(small):
    events, _, spec = small
    assert not set(ACTION_BITS) & set(spec.unseen_tasks)
    assert events["action"].between(0, spec.n_actions - 1).all()
    seen = [t for t in spec.all_tasks if t not in spec.unseen_tasks]
    expected = np.zeros(len(events), dtype=np.int16)
    for task, bit in ACTION_BITS.items():
        expected |= np.where(events[task].fillna(0) == 1, bit, 0).astype(np.int16)
    np.testing.assert_array_equal(events["action"].to_numpy(), expected)
    # The action is a function of the seen labels alone: equal seen labels, equal action.
    per_combo = events.fillna({t: -1 for t in seen}).groupby(seen)["action"].nunique()
    assert (per_combo == 1).all()
    # Hidden impressions do occur, so the check above is not vacuous.
    assert (events[spec.unseen_tasks[0]] == 1).any()


def test_requests_are_consistent_and_sorted(small):
    events, _, _ = small
    per_request = events.groupby("request_id")
    for col in ["user_id", EVENT_TIMESTAMP, "surface", "hour"]:
        assert (per_request[col].nunique() == 1).all(), col
    assert (per_request.size() == SMALL.candidates_per_request).all()
    assert (per_request["item_id"].nunique() == SMALL.candidates_per_request).all()

    order = events[[EVENT_TIMESTAMP, "request_id"]]
    assert order.equals(order.sort_values([EVENT_TIMESTAMP, "request_id"], kind="stable"))

    requests = events.drop_duplicates("request_id")
    # No two requests of one user at the same microsecond.
    assert not requests.duplicated(["user_id", EVENT_TIMESTAMP]).any()
    first_day = pd.Timestamp(SMALL.start, tz="UTC")
    assert requests[EVENT_TIMESTAMP].min() >= first_day
    assert requests[EVENT_TIMESTAMP].max() < first_day + pd.Timedelta(days=SMALL.days)
    expected = SMALL.n_users * SMALL.days * SMALL.requests_per_user_per_day
    assert 0.8 * expected < len(requests) < 1.2 * expected


def test_base_rates(longer):
    events, _, spec = longer
    rate = {t: float(events[t].mean()) for t in spec.all_tasks}  # mean skips NaN
    assert 0.1 <= rate["click"] <= 0.3
    assert 0.02 <= rate["long_view"] <= 0.12
    for task in ["like", "share", "purchase", "follow"]:
        assert 0.005 <= rate[task] <= 0.06, (task, rate[task])
    assert 0.02 <= rate["hide"] <= 0.06
    # Deeper engagement only follows a click.
    for task in ["long_view", "like", "share", "purchase", "follow"]:
        assert (events.loc[events[task] == 1, "click"] == 1).all(), task
    # Surfaces differ: search intent is clicked more than notifications.
    by_surface = events.groupby("surface")["click"].mean()
    assert by_surface["search"] > by_surface["feed"] > by_surface["notif"]


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    ranks = pd.Series(score).rank().to_numpy()
    pos = label.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_old_history_predicts_clicks(longer):
    """Category preferences seen more than 7 days earlier still rank today's clicks."""
    events, items, spec = longer
    cfg_users, k = spec.n_users, spec.n_categories
    day = (events[EVENT_TIMESTAMP] - events[EVENT_TIMESTAMP].min().normalize()).dt.days
    category = items["category"].to_numpy()[events["item_id"].to_numpy()]
    old, new = (day < 6).to_numpy(), (day >= 14).to_numpy()

    clicks = np.zeros((cfg_users, k))
    np.add.at(clicks, (events["user_id"].to_numpy()[old], category[old]), events["click"][old])
    share = (clicks + 0.1) / (clicks.sum(axis=1, keepdims=True) + 0.1 * k)

    users_new, cat_new = events["user_id"].to_numpy()[new], category[new]
    clicked = events["click"].to_numpy()[new] == 1
    auc = _auc(share[users_new, cat_new], clicked)
    # Baseline: another user's old preferences (keeps any global category popularity).
    shuffled = np.random.default_rng(0).permutation(cfg_users)
    auc_other = _auc(share[shuffled[users_new], cat_new], clicked)
    assert auc > 0.58, auc
    assert auc > auc_other + 0.05, (auc, auc_other)

    # The unseen negative task leans the other way: hides come from low interest.
    hide = events["hide"].to_numpy()[new]
    valid = ~np.isnan(hide)
    assert _auc(-share[users_new, cat_new][valid], hide[valid] == 1) > 0.53


def test_interests_drift():
    """Interests move over weeks: last week's clicks follow the third week more than the first."""
    events, items, spec = generate(SyntheticConfig(n_users=300, days=28, seed=0))
    k = spec.n_categories
    day = (events[EVENT_TIMESTAMP] - events[EVENT_TIMESTAMP].min().normalize()).dt.days.to_numpy()
    users = events["user_id"].to_numpy()
    category = items["category"].to_numpy()[events["item_id"].to_numpy()]
    click = events["click"].to_numpy()

    def preference(mask: np.ndarray) -> np.ndarray:
        counts = np.zeros((spec.n_users, k))
        np.add.at(counts, (users[mask], category[mask]), click[mask])
        return (counts + 0.1) / (counts.sum(axis=1, keepdims=True) + 0.1 * k)

    last = day >= 21
    first_week = _auc(preference(day < 7)[users[last], category[last]], click[last] == 1)
    third_week = _auc(
        preference((day >= 14) & (day < 21))[users[last], category[last]], click[last] == 1
    )
    assert first_week > 0.56  # still informative three weeks later...
    assert third_week > first_week + 0.01  # ...but less so than recent history


def test_round_trip(tmp_path: Path, small):
    events, items, spec = small
    write_dataset(tmp_path, events, items, spec)
    assert {p.name for p in tmp_path.iterdir()} == {"events.parquet", "items.parquet", "spec.json"}
    on_disk = pq.read_schema(tmp_path / "events.parquet")
    assert on_disk.field(EVENT_TIMESTAMP).type == pa.timestamp("us", tz="UTC")
    assert on_disk.field("hour").type == pa.int8()
    assert on_disk.field("action").type == pa.int16()

    events2, items2, spec2 = read_dataset(tmp_path)
    pd.testing.assert_frame_equal(events, events2)
    pd.testing.assert_frame_equal(items, items2)
    assert spec2 == spec
