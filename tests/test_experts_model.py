"""Expert model and training: the TAE helps, artifacts round-trip, missing TAEs are handled."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from experts import (
    ExpertConfig,
    ExpertModel,
    add_recent_history,
    evaluate,
    load_expert,
    predict,
    save_expert,
    to_tensors,
    train_expert,
)

N_USERS, N_ITEMS, N_CATEGORIES, N_ACTIONS, TAE_DIM = 300, 120, 6, 4, 16
T0 = pd.Timestamp("2026-01-05", tz="UTC")


def toy_data(seed: int = 0, n_rows: int = 20_000, missing_share: float = 0.15):
    """Labels driven by a user-item affinity that only the `embedding` column reveals.

    The baseline sees item ids, item features and a random recent history: it can learn item
    effects but not who likes what. The embedding carries the affinity plus noise.
    """
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(N_USERS, 4))
    items = rng.normal(size=(N_ITEMS, 4))
    category = rng.integers(0, N_CATEGORIES, size=N_ITEMS)
    quality = rng.normal(size=N_ITEMS).astype(np.float32)

    u = rng.integers(0, N_USERS, size=n_rows)
    i = rng.integers(0, N_ITEMS, size=n_rows)
    affinity = (users[u] * items[i]).sum(axis=1) / 2.0
    click = rng.random(n_rows) < 1 / (1 + np.exp(-(2.0 * affinity + 0.3 * quality[i] - 0.5)))
    # `like` is valid on half of the rows only (another surface's task, say).
    like = (click & (rng.random(n_rows) < 0.5)).astype(np.float32)
    like[rng.random(n_rows) < 0.5] = np.nan
    tae = np.concatenate(
        [affinity[:, None], users[u] * items[i], rng.normal(size=(n_rows, TAE_DIM - 5))], axis=1
    ) + rng.normal(scale=0.1, size=(n_rows, TAE_DIM))
    embedding = [row.astype(np.float32) for row in tae]
    for j in np.flatnonzero(rng.random(n_rows) < missing_share):
        embedding[j] = None
    seconds = np.sort(rng.integers(3600, 30 * 86400, size=n_rows))
    frame = pd.DataFrame(
        {
            "user_id": u.astype(np.int64),
            "item_id": i.astype(np.int64),
            "event_timestamp": (T0 + pd.to_timedelta(seconds, unit="s")).astype(
                "datetime64[us, UTC]"
            ),
            "surface": "feed",
            "click": click.astype(np.float32),
            "like": like,
            "embedding": pd.Series(embedding, dtype=object),
            "category": category[i].astype(np.int64),
            "quality": quality[i],
        }
    )
    n_ev = 20_000
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, N_USERS, size=n_ev),
            "item_id": rng.integers(0, N_ITEMS, size=n_ev),
            "event_timestamp": (
                T0 + pd.to_timedelta(rng.integers(0, 30 * 86400, size=n_ev), unit="s")
            ).astype("datetime64[us, UTC]"),
            "action": rng.integers(0, N_ACTIONS, size=n_ev),
        }
    )
    return frame, events


def config(name: str, fm_version: str | None, **kw) -> ExpertConfig:
    base = dict(
        surface="feed",
        tasks=["click", "like"],
        history_length=6,
        hidden_dim=32,
        epochs=3,
        batch_size=256,
        lr=3e-3,
        seed=0,
        dropout=0.1,
    )
    return ExpertConfig(name=name, fm_version=fm_version, **{**base, **kw})


def train(cfg: ExpertConfig, frame: pd.DataFrame) -> ExpertModel:
    return train_expert(
        cfg,
        frame,
        n_items=N_ITEMS,
        n_categories=N_CATEGORIES,
        n_actions=N_ACTIONS,
        tae_dim=TAE_DIM if cfg.fm_version else None,
        progress=False,
    )


@pytest.fixture(scope="module")
def data():
    frame, events = toy_data()
    frame = add_recent_history(frame, events, 6)
    cut = int(len(frame) * 0.75)
    return frame.iloc[:cut].reset_index(drop=True), frame.iloc[cut:].reset_index(drop=True)


@pytest.fixture(scope="module")
def fm_model(data):
    return train(config("feed_v1", "v1", embedding_noise=0.05), data[0])


def test_embedding_beats_the_no_fm_baseline(data, fm_model):
    train_frame, test_frame = data
    baseline = train(config("feed_nofm", None), train_frame.drop(columns="embedding"))
    ne_fm = evaluate(fm_model, test_frame)
    ne_base = evaluate(baseline, test_frame.drop(columns="embedding"))
    assert set(ne_fm) == {"click", "like"}
    # The baseline can learn item effects only; the FM expert sees the affinity.
    assert ne_base["click"] > 0.85, ne_base
    assert ne_fm["click"] < ne_base["click"] - 0.12, (ne_fm, ne_base)
    assert ne_fm["like"] < ne_base["like"] - 0.05, (ne_fm, ne_base)
    # Rows without a TAE fall back to the learned "missing" vector: about baseline quality.
    gone = test_frame["embedding"].isna().to_numpy()
    assert gone.sum() > 500
    ne_gone = evaluate(fm_model, test_frame[gone])["click"]
    ne_gone_base = evaluate(baseline, test_frame[gone].drop(columns="embedding"))["click"]
    assert ne_gone < ne_gone_base + 0.05, (ne_gone, ne_gone_base)


def test_training_is_seeded(data):
    small = data[0].iloc[:1500]
    cfg = config("feed_v1", "v1", epochs=1, embedding_noise=0.1)
    a, b = train(cfg, small), train(cfg, small)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    train(cfg, small)  # must not touch the global RNG
    assert torch.equal(torch.rand(1), before)


def test_save_load_gives_identical_predictions(tmp_path, data, fm_model):
    path = save_expert(fm_model, fm_model.cfg, tmp_path / "models" / "feed_v1.pt")
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"format", "config", "dims", "state_dict"}
    loaded = load_expert(path)
    assert loaded.cfg == fm_model.cfg
    assert not loaded.training
    np.testing.assert_array_equal(predict(loaded, data[1]), predict(fm_model, data[1]))
    with pytest.raises(ValueError):
        save_expert(fm_model, config("other", "v1"), tmp_path / "x.pt")


def test_scores_do_not_depend_on_the_batch(data, fm_model):
    test_frame = data[1]
    full = predict(fm_model, test_frame)
    assert full.shape == (len(test_frame), 2)
    assert np.isfinite(full).all() and (full > 0).all() and (full < 1).all()
    part = predict(fm_model, test_frame.iloc[[5, 3, 17]])
    np.testing.assert_allclose(part, full[[5, 3, 17]], rtol=1e-5, atol=1e-6)


def test_missing_embeddings_and_serving_style_frames(data, fm_model):
    rows = data[1].iloc[:20].drop(columns=["click", "like"]).reset_index(drop=True)
    probs = predict(fm_model, rows)
    # A missing TAE as None, NaN or a NaN-filled vector: all mean "missing".
    as_none = rows.assign(embedding=[None] * len(rows))
    as_nan = rows.assign(embedding=[np.nan] * len(rows))
    as_nan_vec = rows.assign(embedding=[np.full(TAE_DIM, np.nan, np.float32)] * len(rows))
    p_none = predict(fm_model, as_none)
    np.testing.assert_array_equal(predict(fm_model, as_nan), p_none)
    np.testing.assert_array_equal(predict(fm_model, as_nan_vec), p_none)
    assert not np.allclose(p_none, probs)
    # The serving path: unknown items and categories, NaN features, histories of any length.
    served = rows.assign(
        item_id=np.arange(len(rows)) + N_ITEMS - 10,  # half of them unknown to the model
        category=[np.nan if j % 3 == 0 else float(j % N_CATEGORIES) for j in range(len(rows))],
        quality=[np.nan if j % 4 == 0 else 0.5 for j in range(len(rows))],
        recent_items=[np.arange(j % 11, dtype=np.int64) for j in range(len(rows))],
        recent_actions=[np.ones(j % 11, dtype=np.int64) for j in range(len(rows))],
    )
    assert np.isfinite(predict(fm_model, served)).all()


def test_baseline_model_ignores_embeddings_and_counts_costs(data, fm_model):
    cfg = config("feed_nofm", None, epochs=1)
    base = train(cfg, data[0].iloc[:500].drop(columns="embedding"))
    assert base.fm_embedding is None and base.fm_fusion is None
    # An embedding column that happens to be there is ignored by the baseline.
    np.testing.assert_array_equal(
        predict(base, data[1].iloc[:50]), predict(base, data[1].iloc[:50].drop(columns="embedding"))
    )
    assert 0 < base.param_count() < fm_model.param_count()
    assert 0 < base.flops_per_candidate() < fm_model.flops_per_candidate()
    tensors = to_tensors(data[1].iloc[:10], cfg, None)
    assert "tae" not in tensors and tensors["labels"].shape == (10, 2)


def test_dims_must_match_the_pin():
    with pytest.raises(ValueError):
        ExpertModel(config("feed_v1", "v1"), None, N_ITEMS, N_CATEGORIES, N_ACTIONS)
    with pytest.raises(ValueError, match="lacks `embedding`"):
        to_tensors(pd.DataFrame({"item_id": [1]}), config("feed_v1", "v1"), TAE_DIM)


def test_forward_shapes_without_tae_tensor():
    model = ExpertModel(config("feed_v1", "v1"), TAE_DIM, N_ITEMS, N_CATEGORIES, N_ACTIONS)
    b, k = 5, 6
    logits = model(
        None,
        torch.zeros(b),
        torch.zeros(b, k, dtype=torch.long),
        torch.zeros(b, k, dtype=torch.long),
        torch.arange(b),
        torch.zeros(b, dtype=torch.long),
        torch.zeros(b),
    )
    assert logits.shape == (b, 2)


def test_state_dict_keys_of_saved_experts_are_stable():
    """Saved experts load by these names: renaming a module attribute would orphan every
    artifact already written (the layer classes may be renamed, their attributes not)."""
    cfg = ExpertConfig(name="keys", surface="feed", tasks=["click"], fm_version="v1",
                       history_length=4, hidden_dim=8)
    keys = list(ExpertModel(cfg, 6, 10, 3, 4).state_dict())
    assert keys == [
        "item_embedding.weight", "short_term.positions", "short_term.empty",
        "short_term.items.weight", "short_term.actions.weight", "short_term.layer.rel_bias",
        "short_term.layer.uvqk.weight", "short_term.layer.uvqk.bias",
        "short_term.layer.out_norm.weight", "short_term.layer.out_norm.bias",
        "short_term.layer.out.weight", "short_term.layer.out.bias", "short_term.norm.weight",
        "short_term.norm.bias", "fm_embedding.missing", "fm_embedding.norm.weight",
        "fm_embedding.norm.bias", "fm_embedding.proj.weight", "fm_embedding.proj.bias",
        "fm_fusion.0.weight", "fm_fusion.0.bias", "fm_fusion.3.weight", "fm_fusion.3.bias",
        "item_encoder.items.weight", "item_encoder.categories.weight",
        "item_encoder.quality_proj.weight", "item_encoder.quality_proj.bias", "item_proj.weight",
        "item_proj.bias", "expert_fusion.0.weight", "expert_fusion.0.bias",
        "expert_fusion.3.weight", "expert_fusion.3.bias", "heads.0.weight", "heads.0.bias",
    ]


def _held_out_loss(model: ExpertModel, frame: pd.DataFrame) -> float:
    from experts.dataset import batch_inputs
    from experts.train import masked_bce

    model.eval()
    t = to_tensors(frame, model.cfg, model.tae_dim)
    with torch.no_grad():
        return float(masked_bce(model(**batch_inputs(t, slice(0, len(frame)))), t["labels"]))


def test_early_stopping_keeps_the_best_epoch_on_the_latest_rows():
    # Labels unrelated to the features: a wide model at a high lr overfits within a few epochs.
    frame, events = toy_data(seed=3, n_rows=1500, missing_share=0.0)
    rng = np.random.default_rng(3)
    frame["click"] = (rng.random(len(frame)) < 0.3).astype(np.float32)
    frame = add_recent_history(frame.drop(columns="embedding"), events, 6)
    n_held = round(0.2 * len(frame))  # rows are in time order: the held-out ones are the last
    fit, held = frame.iloc[:-n_held].reset_index(drop=True), frame.iloc[-n_held:]
    kw = dict(epochs=8, hidden_dim=128, lr=1e-2, dropout=0.0)
    stopped = train(config("feed_es", None, holdout_frac=0.2, **kw), frame)

    # Replay without early stopping on the same training rows, one run per epoch count, and
    # apply the rule: stop at the first epoch that does not improve on the best held-out loss.
    losses = [_held_out_loss(train(config("feed_es", None, **{**kw, "epochs": e}), fit), held)
              for e in range(1, 9)]
    best = 0
    while best + 1 < len(losses) and losses[best + 1] < losses[best]:
        best += 1
    assert best + 1 < 8, f"no overfitting to stop: {losses}"
    replay = train(config("feed_es", None, **{**kw, "epochs": best + 1}), fit)
    for (name, a), b in zip(stopped.state_dict().items(), replay.state_dict().values(),
                            strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert _held_out_loss(stopped, held) < losses[-1]


def test_holdout_frac_is_checked():
    with pytest.raises(ValueError, match="holdout_frac"):
        config("feed_bad", None, holdout_frac=0.7)


def test_holdout_leaving_no_training_labels_is_an_error(data):
    frame = data[0].copy()
    frame.loc[: int(len(frame) * 0.9), ["click", "like"]] = np.nan
    with pytest.raises(ValueError, match="no valid labels left for training"):
        train(config("feed_es", "v1", holdout_frac=0.2), frame)


def test_a_holdout_too_small_or_unlabelled_trains_on_every_row(data):
    frame = data[0].iloc[:900].reset_index(drop=True)
    unlabelled_tail = frame.assign(**{t: frame[t].where(frame.index < 700) for t in ("click", "like")})
    # 10% of 900 = 90 rows, too few to stop on; 20% = 180 rows, none of them labelled
    for f, frac in ((frame, 0.1), (unlabelled_tail, 0.2)):
        plain = train(config("feed_es", "v1"), f)
        model = train(config("feed_es", "v1", holdout_frac=frac), f)
        for a, b in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a, b)
