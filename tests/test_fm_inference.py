"""Per-user history cache across requests, long histories (>= 1024), item content vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm import FMConfig, FoundationModel, TAEEngine, UserHistories, load_checkpoint, save_checkpoint
from fm.batching import collate
from fm.history import timestamps_us
from fm.inference import HistoryCache, history_fingerprints
from fm.testing import toy_config_kwargs, toy_events


@pytest.fixture(scope="module")
def events():
    return toy_events(n_users=8, n_items=40, n_requests=200, n_candidates=4, seed=11)


@pytest.fixture(scope="module")
def config():
    return FMConfig.small(**toy_config_kwargs(40), max_history=24)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    m = FoundationModel(config)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m.eval()


def ts_of(events):
    return timestamps_us(events["event_timestamp"])


# ---- history cache ------------------------------------------------------------------------------


def test_cache_hit_equals_uncached_exactly(model, events):
    h = UserHistories.from_events(events, model.config.surfaces)
    plain = TAEEngine(model, h)
    cached = TAEEngine(model, h, history_cache=True)
    late = int(ts_of(events).max()) + 1
    items_a, items_b = np.array([1, 5, 9]), np.array([2, 5, 33, 7, 8])

    first = cached.compute_request(3, late, "feed", items_a)  # miss: fills the cache
    assert cached.cache.stats.misses == 1 and cached.cache.stats.hits == 0 and 3 in cached.cache
    second = cached.compute_request(3, late + 1000, "video", items_b)  # same history: a hit
    assert cached.cache.stats.hits == 1

    assert np.array_equal(first, plain.compute_request(3, late, "feed", items_a))
    assert np.array_equal(second, plain.compute_request(3, late + 1000, "video", items_b))
    # the shared candidate got the same history; its TAE differs only by the request context
    assert np.abs(second - plain.compute_request(3, late, "feed", items_b)).max() > 1e-4


def test_cache_in_mixed_batches_matches_uncached(model, events):
    h = UserHistories.from_events(events, model.config.surfaces)
    ts = ts_of(events)
    rng = np.random.default_rng(0)
    n = 60
    users = rng.integers(0, 8, n)
    times = rng.choice(np.quantile(ts, [0.3, 0.6, 1.0]).astype(np.int64) + 1, n)
    items = rng.integers(0, 40, n)
    surf = np.asarray(model.config.surfaces, dtype=object)[rng.integers(0, 2, n)]

    want = TAEEngine(model, h, max_groups=5).compute(users, items, times, surf)
    engine = TAEEngine(model, h, max_groups=5, history_cache=HistoryCache())
    for _ in range(2):  # second round: mostly hits, padded together with misses
        got = engine.compute(users, items, times, surf)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert engine.cache.stats.hits > 0 and engine.cache.stats.misses > 0


def test_cache_invalidated_when_the_history_grows(model, events):
    ts = ts_of(events)
    user = int(events["user_id"].iloc[0])
    mine = np.flatnonzero(events["user_id"].to_numpy() == user)
    cut = int(ts[mine[len(mine) // 2]])
    old_log = events[ts < cut]
    h_old = UserHistories.from_events(old_log, model.config.surfaces)
    h_new = UserHistories.from_events(events, model.config.surfaces)
    late = int(ts.max()) + 1

    engine = TAEEngine(model, h_old, history_cache=True)
    before = engine.compute_request(user, late, "feed", np.array([4, 6]))
    fp_before = engine.cache.fingerprint(user)
    engine.set_histories(h_new)  # the user's history grew
    after = engine.compute_request(user, late, "feed", np.array([4, 6]))
    assert engine.cache.stats.invalidations == 1 and engine.cache.stats.hits == 0
    assert engine.cache.fingerprint(user) != fp_before
    np.testing.assert_array_equal(
        after, TAEEngine(model, h_new).compute_request(user, late, "feed", np.array([4, 6]))
    )
    assert np.abs(after - before).max() > 1e-4  # the stale entry was not used

    # another user whose history did not change keeps hitting across the swap
    other = int(old_log["user_id"].iloc[-1])
    engine.set_histories(h_old)
    engine.compute_request(other, cut, "feed", np.array([4]))
    engine.set_histories(h_new)
    hits = engine.cache.stats.hits
    engine.compute_request(other, cut, "feed", np.array([5]))
    assert engine.cache.stats.hits == hits + 1


def test_history_fingerprints(events):
    h = UserHistories.from_events(events, ["feed", "video"])
    late = int(ts_of(events).max()) + 1
    fp = history_fingerprints(h, np.array([0, 0, 999]), np.array([late, 0, late]), 5)
    n0 = int((events["user_id"] == 0).sum())
    assert fp[0].tolist()[:2] == [n0, 5] and fp[0, 2] > 0
    assert fp[1].tolist() == [0, 0, -1]  # before anything happened
    assert fp[2].tolist() == [0, 0, -1]  # unknown user


def test_cache_lru_byte_budget():
    kv = [(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))]  # 512 bytes
    cache = HistoryCache(max_bytes=1200)
    cache.put(1, (1, 1, 1), kv)
    cache.put(2, (1, 1, 1), kv)
    assert cache.get(1, (1, 1, 1)) is kv  # 1 becomes the most recent
    cache.put(3, (1, 1, 1), kv)  # over budget: the least recent (2) goes
    assert 2 not in cache and 1 in cache and 3 in cache
    assert cache.stats.evictions == 1 and cache.nbytes == 1024
    assert cache.get(1, (2, 1, 1)) is None and 1 not in cache  # grown history: dropped
    assert cache.stats.invalidations == 1
    # a request for an OLDER history of user 3 (a backfill) misses but keeps the newer entry
    assert cache.get(3, (0, 0, -1)) is None and cache.fingerprint(3) == (1, 1, 1)
    cache.put(3, (0, 0, -1), kv)
    assert cache.fingerprint(3) == (1, 1, 1) and cache.stats.invalidations == 1


# ---- long histories -----------------------------------------------------------------------------


def test_long_history_truncates_to_the_most_recent_1024():
    ev = toy_events(n_users=1, n_items=50, n_requests=300, n_candidates=5, seed=2)  # 1500 events
    cfg = FMConfig.small(**toy_config_kwargs(50), max_history=1024, d_model=16, n_heads=2)
    assert cfg.attn_norm_len == 1025
    torch.manual_seed(0)
    model = FoundationModel(cfg).eval()
    assert model.rank.num_embeddings == 1024
    h = UserHistories.from_events(ev, cfg.surfaces)
    late = int(ts_of(ev).max()) + 1

    def batch(hist):
        return collate(
            hist,
            cfg,
            np.array([0]),
            np.array([late]),
            np.array([0, 3]),
            np.array([1, 2, 3]),
            np.array([0, 1, 0]),
        )

    b = batch(h)
    assert b.hist_len.tolist() == [1024] and b.n_hist == 1024
    assert int(b.hist_rank.max()) == 1023
    order = np.argsort(ts_of(ev), kind="stable")
    assert int(b.hist_item[0, -1]) in set(ev["item_id"].to_numpy()[order][-5:])
    with torch.no_grad():
        joint = model(b)
        cached = model.encode_targets(b, model.encode_history(b))
        # events older than the kept window change nothing
        recent = ev.iloc[order[-1100:]]
        trimmed = model(batch(UserHistories.from_events(recent, cfg.surfaces)))
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=0)
    torch.testing.assert_close(trimmed, joint, atol=1e-5, rtol=0)
    assert torch.isfinite(joint).all()


# ---- item content vectors -----------------------------------------------------------------------


def test_item_content_feeds_f_and_travels_with_checkpoints(events, tmp_path):
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=16, content_dim=6)
    content = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    torch.manual_seed(0)
    model = FoundationModel(cfg, content).eval()
    assert torch.equal(model.embed.content, torch.as_tensor(content))
    assert "embed.content" in model.state_dict()
    assert not any(n == "embed.content" for n, _ in model.named_parameters())  # never trained

    item = torch.tensor([3, 3])
    surface, hour = torch.tensor([0, 0]), torch.tensor([5, 5])
    f1 = model.embed(item, surface, hour)
    model2 = FoundationModel(cfg, content).eval()
    model2.load_state_dict(model.state_dict())
    with torch.no_grad():
        model2.embed.content[3] += 1.0  # another content vector for item 3
        assert (model2.embed(item, surface, hour) - f1).abs().max() > 1e-4

    serving = save_checkpoint(model, tmp_path / "serving.pt", serving=True)
    loaded, _ = load_checkpoint(serving)
    assert torch.equal(loaded.embed.content, model.embed.content)
    h = UserHistories.from_events(events, cfg.surfaces)
    late = int(ts_of(events).max()) + 1
    a = TAEEngine(model, h).compute_request(2, late, "feed", np.array([1, 2, 3]))
    b = TAEEngine(loaded, h).compute_request(2, late, "feed", np.array([1, 2, 3]))
    np.testing.assert_array_equal(a, b)


def test_item_content_is_checked(config):
    with pytest.raises(ValueError, match="content_dim is 0"):
        FoundationModel(config, np.zeros((40, 3)))
    cfg = FMConfig.small(**toy_config_kwargs(40), content_dim=3)
    with pytest.raises(ValueError, match=r"\[40, 3\]"):
        FoundationModel(cfg, np.zeros((39, 3)))
    assert FoundationModel(cfg).embed.content.shape == (40, 3)  # zeros until given
    assert FoundationModel(config).embed.content is None


def test_train_streaming_with_content(events):
    from fm import train_streaming

    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=8, batch_requests=32, content_dim=4)
    content = np.random.default_rng(1).normal(size=(40, 4))
    res = train_streaming(events, cfg, max_steps=2, progress=False, item_content=content)
    assert res.steps == 2
    np.testing.assert_allclose(res.model.embed.content.numpy(), content, atol=1e-6)
    assert all(np.isfinite(v) for v in res.ne.values())
