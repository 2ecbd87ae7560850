"""Item ids outside the FM's vocabulary: history items read the shared OOV row, unknown
candidates are reported (NaN rows, `known_items`), training never dies on them, item 0 is a
real item, and checkpoints written before the OOV row existed load unchanged."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fm import FMConfig, FoundationModel, TAEEngine, UserHistories, load_checkpoint
from fm.batching import Requests
from fm.checkpoint import FORMAT
from fm.export import export_serving
from fm.history import timestamps_us
from fm.testing import toy_config_kwargs, toy_events
from fm.train import evaluate_fm, train_streaming
from fm.user_embedding import compute_user_embeddings, train_ue_streaming

N_ITEMS = 40


@pytest.fixture(scope="module")
def config():
    return FMConfig.small(**toy_config_kwargs(N_ITEMS), max_history=16)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    m = FoundationModel(config)
    with torch.no_grad():  # large weights: any change of input shows in the TAE
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m.eval()


def one_user_log(items: list[int], user: int = 7) -> pd.DataFrame:
    """One user's events, one per minute from 2024-01-01 10:00 UTC, items as given."""
    n = len(items)
    ts = pd.Timestamp("2024-01-01 10:00", tz="UTC") + pd.to_timedelta(np.arange(n), unit="min")
    return pd.DataFrame(
        {
            "request_id": np.arange(n, dtype=np.int64),
            "user_id": np.full(n, user, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "event_timestamp": ts.astype("datetime64[us, UTC]"),
            "surface": ["feed"] * n,
            "action": np.ones(n, dtype=np.int16),
            "click": np.ones(n, np.float32),
            "like": np.zeros(n, np.float32),
            "long_view": np.zeros(n, np.float32),
            "complete": np.full(n, np.nan, np.float32),
        }
    )


LATE = int(pd.Timestamp("2024-01-02", tz="UTC").value // 1000)


def taes(model, items_in_history, candidates, user=7):
    h = UserHistories.from_events(one_user_log(items_in_history, user), model.config.surfaces)
    return TAEEngine(model, h).compute_request(user, LATE, "feed", np.asarray(candidates))


def test_history_items_outside_the_vocabulary_share_the_oov_row(model):
    base = taes(model, [3, 5, N_ITEMS, 9], [1, 2])  # N_ITEMS: one past the last known id
    assert np.isfinite(base).all()
    # every unknown id (newer, far newer, negative) reads the same row: identical TAEs
    np.testing.assert_array_equal(base, taes(model, [3, 5, 10**12, 9], [1, 2]))
    np.testing.assert_array_equal(base, taes(model, [3, 5, -4, 9], [1, 2]))
    # it is a token of its own (kept, not skipped): not a known item, not absent
    assert np.abs(base - taes(model, [3, 5, 8, 9], [1, 2])).max() > 1e-3
    assert np.abs(base - taes(model, [3, 5, 9], [1, 2])).max() > 1e-3


def test_the_oov_row_is_zero_and_not_a_weight(model, config):
    embed = model.embed
    item, surface, hour = torch.tensor([N_ITEMS, -1]), torch.tensor([0, 0]), torch.tensor([3, 3])
    want = embed.mlp(
        torch.cat([torch.zeros(2, config.d_model), embed.surface(surface), embed.hour(hour)], -1)
    )
    torch.testing.assert_close(embed(item, surface, hour), want, rtol=0, atol=0)
    # the state dict is the pre-OOV layout: n_items rows, no extra key
    assert model.state_dict()["embed.item.weight"].shape == (N_ITEMS, config.item_width)
    assert not any("oov" in k for k in model.state_dict())


def test_unknown_candidates_are_nan_rows_and_known_items_names_them(model):
    h = UserHistories.from_events(one_user_log([3, 5, 9]), model.config.surfaces)
    engine = TAEEngine(model, h)
    cands = np.array([0, 5, N_ITEMS, -1, 10**9, N_ITEMS - 1])
    assert engine.known_items(cands).tolist() == [True, True, False, False, False, True]
    assert engine.n_items == N_ITEMS
    got = engine.compute_request(7, LATE, "feed", cands)
    assert got.shape == (6, model.config.d_model)
    assert np.isnan(got[2:5]).all()
    np.testing.assert_array_equal(
        got[[0, 1, 5]], engine.compute_request(7, LATE, "feed", np.array([0, 5, N_ITEMS - 1]))
    )
    only_unknown = engine.compute_request(7, LATE, "feed", np.array([-3, N_ITEMS]))
    assert only_unknown.shape == (2, model.config.d_model) and np.isnan(only_unknown).all()
    with pytest.raises(ValueError, match="lengths"):
        engine.compute(np.array([7, 7]), np.array([1]), np.array([LATE, LATE]), ["feed"] * 2)


def test_item_zero_is_a_real_item_not_padding(model):
    with_zero = taes(model, [3, 0], [0, 1])
    assert np.isfinite(with_zero).all()
    # a history of item 0 differs from another item and from no event at all
    assert np.abs(with_zero - taes(model, [3, 1], [0, 1])).max() > 1e-3
    assert np.abs(with_zero - taes(model, [3], [0, 1])).max() > 1e-3
    # candidate 0 gets its own TAE
    assert np.abs(with_zero[0] - with_zero[1]).max() > 1e-3
    # in a padded batch a history ending in item 0 keeps it: hist_len counts it
    reqs_h = UserHistories.from_events(one_user_log([0], user=1), model.config.surfaces)
    assert reqs_h.lookup(np.array([1]), np.array([LATE]), 16)[1].tolist() == [1]


def test_training_on_ids_outside_the_vocabulary_maps_them_to_oov():
    events = toy_events(n_users=10, n_items=30, n_requests=160, n_candidates=4, seed=2)
    items = events["item_id"].to_numpy().copy()
    items[::7] = 30 + np.arange(len(items[::7]))  # items newer than the model
    items[3::11] = -1  # and negative ids
    events = events.assign(item_id=items)
    cfg = FMConfig.small(**toy_config_kwargs(30), max_history=8, batch_requests=16)
    res = train_streaming(events, cfg, max_steps=4, progress=False)
    assert res.steps == 4 and all(math.isfinite(v) for v in res.ne.values())
    ts = events["event_timestamp"]
    ne = evaluate_fm(res.model, events, cfg, ts.quantile(0.5), ts.max() + pd.Timedelta(1, "s"))
    assert all(math.isfinite(v) for v in ne.values())
    # the batches really held such ids, in histories and among candidates
    b = Requests.from_events(events, cfg).batch(100, 140, UserHistories.from_events(events), cfg)
    assert (b.hist_item >= 30).any() and (b.tgt_item < 0).any()
    ue = train_ue_streaming(events, cfg, max_steps=2, progress=False).model
    emb = compute_user_embeddings(
        ue, UserHistories.from_events(events), events["user_id"].to_numpy()[-5:],
        timestamps_us(ts)[-5:],
    )
    assert np.isfinite(emb).all()


def test_checkpoints_written_before_the_oov_row_load_and_handle_unknown_ids(config, tmp_path):
    """A checkpoint exactly as the code before this change wrote it: its config has neither
    `time_zone` nor `item_dim`, its item table is d_model wide, no lift."""
    torch.manual_seed(0)
    model = FoundationModel(FMConfig.from_dict({**config.to_dict(), "item_dim": 0}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    old_config = model.config.to_dict()
    old_config.pop("time_zone")
    old_config.pop("item_dim")
    for serving in (False, True):
        state = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if not (serving and FoundationModel.is_head_param(k))
        }
        path = tmp_path / f"old_{serving}.pt"
        torch.save(
            {"format": FORMAT, "serving": serving, "config": old_config, "state_dict": state,
             "extra": {"step": 3}},
            path,
        )
        loaded, extra = load_checkpoint(path)
        assert extra == {"step": 3} and loaded.config.time_zone == "UTC"
        assert loaded.embed.item_up is None and loaded.config.item_width == config.d_model
        want = taes(model, [3, N_ITEMS, 9], [1, 2, N_ITEMS])
        got = taes(loaded, [3, N_ITEMS, 9], [1, 2, N_ITEMS])
        np.testing.assert_array_equal(got, want)
        assert np.isnan(got[2]).all() and np.isfinite(got[:2]).all()
    # and `foundex fm export` of an old training checkpoint still verifies
    report = export_serving(tmp_path / "old_False.pt", tmp_path / "served.pt")
    assert report.dropped == ["aux_heads", "main_head"]


def test_an_item_the_fm_never_trained_on_reads_as_the_oov_row():
    # Item rows start at zero, the OOV row's value, and get no gradient unless their item is
    # in a training batch: after training, an item first seen later is "unknown", not noise.
    events = toy_events(n_users=10, n_items=N_ITEMS, n_requests=60, n_candidates=3, seed=5)
    events = events[events["item_id"] < 30]  # items 30..39 never appear in training
    cfg = FMConfig(**toy_config_kwargs(N_ITEMS), max_history=8, batch_requests=16,
                   weight_decay=0.1)
    model = train_streaming(events, cfg, progress=False).model
    table = model.embed.item.weight.detach()
    seen = np.unique(events["item_id"].to_numpy())
    unseen = np.setdiff1d(np.arange(N_ITEMS), seen)
    assert len(unseen) >= 10 and (table[unseen] == 0).all() and (table[seen] != 0).any(dim=1).all()
    # as history: an untrained item gives the TAE an OOV id gives; a trained one does not
    got = taes(model, [3, 35, 9], [1])
    np.testing.assert_array_equal(got, taes(model, [3, 10**9, 9], [1]))
    assert 5 in seen and np.abs(got - taes(model, [3, 5, 9], [1])).max() > 1e-6
    # as candidates: two untrained items are indistinguishable, two trained ones are not
    two = taes(model, [3, 5, 9], [35, 36, 1, 2])
    np.testing.assert_array_equal(two[0], two[1])
    assert {1, 2} <= set(seen) and np.abs(two[2] - two[3]).max() > 1e-6
