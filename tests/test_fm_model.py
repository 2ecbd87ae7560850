"""FM encoder: the target-aware mask, attention paths, TAE invariance, per-task loss spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm import FMConfig, FoundationModel, UserHistories, ops
from fm.batching import Batch, Requests, collate
from fm.history import timestamps_us
from fm.testing import toy_config_kwargs, toy_events

ATOL = 1e-5


@pytest.fixture(scope="module")
def events():
    return toy_events(n_users=12, n_items=40, n_requests=240, n_candidates=4, seed=3)


@pytest.fixture(scope="module")
def config():
    # max_history small so that some users are truncated and others padded
    return FMConfig.small(**toy_config_kwargs(40), max_history=8)


@pytest.fixture(scope="module")
def histories(events, config):
    return UserHistories.from_events(events, config.surfaces)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    m = FoundationModel(config)
    # Large random weights: any leak between candidates or batch rows would show up clearly.
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m.eval()


def one_request(histories, config, user, ts, items, surface="feed") -> Batch:
    return many_requests(histories, config, [(user, ts, items, surface)])


def many_requests(histories, config, reqs) -> Batch:
    """reqs: list of (user, ts_us, items, surface); hours come from ts_us."""
    users, tss, items, surf, offsets = [], [], [], [], [0]
    for user, ts, its, s in reqs:
        users.append(user)
        tss.append(ts)
        items.extend(its)
        surf.extend([config.surfaces.index(s)] * len(its))
        offsets.append(offsets[-1] + len(its))
    return collate(
        histories,
        config,
        np.array(users),
        np.array(tss),
        np.array(offsets),
        np.array(items),
        np.array(surf),
    )


def pick_users(events):
    """(user with a long history, its late request time) plus a second and a third user."""
    counts = events["user_id"].value_counts()
    rich, mid, poor = counts.index[0], counts.index[len(counts) // 2], counts.index[-1]
    late_ts = int(timestamps_us(events["event_timestamp"]).max()) + 1
    return rich, mid, poor, late_ts


# ---- mask and attention ops -----------------------------------------------------------------


def test_target_aware_mask_layout():
    # 3 history slots (2 real, 1 padding) then 2 targets
    mask = ops.target_aware_mask(3, 2, torch.tensor([2]))[0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # h0: itself
            [1, 1, 0, 0, 0],  # h1: causal
            [1, 1, 0, 0, 0],  # padding row: never attended to, its output is unused
            [1, 1, 0, 1, 0],  # t0: valid history + itself
            [1, 1, 0, 0, 1],  # t1: valid history + itself, never t0
        ]
    )
    assert torch.equal(mask, expected)


def test_cached_attention_equals_joint_attention():
    torch.manual_seed(1)
    B, H, N, M, dh = 3, 2, 5, 4, 8
    q, k, v = (torch.randn(B, H, N + M, dh) for _ in range(3))
    hist_len = torch.tensor([5, 2, 0])
    joint = ops.target_aware_attention(q, k, v, hist_len, N, norm_len=7)
    cached = ops.cached_target_attention(
        q[:, :, N:], k[:, :, N:], v[:, :, N:], k[:, :, :N], v[:, :, :N], hist_len, norm_len=7
    )
    torch.testing.assert_close(joint[:, :, N:], cached, atol=ATOL, rtol=0)


def test_attention_normalised_by_fixed_length_not_batch_max():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    short = ops.target_aware_attention(q, k, v, torch.tensor([2]), 2, norm_len=10)
    # pad the history with 5 junk slots: the target's output must not move
    pad = torch.randn(1, 1, 5, 4) * 100
    cat = [torch.cat([x[:, :, :2], pad, x[:, :, 2:]], dim=2) for x in (q, k, v)]
    long = ops.target_aware_attention(*cat, torch.tensor([2]), 7, norm_len=10)
    torch.testing.assert_close(short[:, :, 2], long[:, :, 7], atol=ATOL, rtol=0)


# ---- TAE invariance -------------------------------------------------------------------------


def test_tae_ignores_other_candidates_and_their_order(model, histories, config, events):
    rich, _, _, ts = pick_users(events)
    base = model(one_request(histories, config, rich, ts, [3, 17]))[0]  # [2, d]
    more = model(one_request(histories, config, rich, ts, [25, 17, 9, 3, 30]))[0]
    alone = model(one_request(histories, config, rich, ts, [17]))[0]
    torch.testing.assert_close(more[3], base[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(more[1], base[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(alone[0], base[1], atol=ATOL, rtol=0)
    # and it is a real function of the candidate: different items differ
    assert (base[0] - base[1]).abs().max() > 1e-2


def test_tae_ignores_batch_composition_and_padding(model, histories, config, events):
    rich, mid, poor, ts = pick_users(events)
    alone = model(one_request(histories, config, mid, ts, [4, 8]))[0]
    batch = many_requests(
        histories,
        config,
        [
            (rich, ts, [1, 2, 3, 5, 6, 7], "video"),  # longer history, more candidates
            (mid, ts, [4, 8], "feed"),
            (poor, ts - 10**12, [9], "feed"),  # (nearly) empty history
            (99_999, ts, [10, 11, 12], "video"),  # unknown user: empty history
        ],
    )
    assert batch.hist_len.min() < batch.hist_len.max()  # padding really happens
    assert batch.n_tgt > 2
    torch.testing.assert_close(model(batch)[1, :2], alone, atol=ATOL, rtol=0)
    # the cached-history path gives the same TAEs
    cached = model.encode_targets(batch, model.encode_history(batch))
    torch.testing.assert_close(
        cached[batch.tgt_mask], model(batch)[batch.tgt_mask], atol=ATOL, rtol=0
    )
    # sanity: the TAE does depend on the user's history
    other = model(one_request(histories, config, rich, ts, [4, 8]))[0]
    assert (other - alone).abs().max() > 1e-2


def test_dropout_is_off_in_eval(histories, config, events):
    torch.manual_seed(0)
    m = FoundationModel(FMConfig.from_dict({**config.to_dict(), "dropout": 0.5})).eval()
    rich, _, _, ts = pick_users(events)
    b = one_request(histories, config, rich, ts, [1, 2, 3])
    torch.testing.assert_close(m(b), m(b), atol=0, rtol=0)


# ---- loss spaces ----------------------------------------------------------------------------


def labelled_batch(events, histories, config):
    reqs = Requests.from_events(events, config)
    return reqs.batch(100, 140, histories, config)


def test_sample_outside_a_task_gives_that_task_no_gradient(model, events, histories, config):
    b = labelled_batch(events, histories, config)
    col = {t: i for i, t in enumerate(config.fm_tasks)}
    tae = model(b).detach().requires_grad_(True)
    _, losses = model.loss(b, tae)

    for task, outside in [
        ("like", torch.isnan(b.labels[..., col["like"]])),  # NaN label
        ("long_view", b.tgt_surface != config.surfaces.index("feed")),  # other surface
        ("complete", b.tgt_surface != config.surfaces.index("video")),
    ]:
        (grad,) = torch.autograd.grad(losses[task], tae, retain_graph=True)
        inside = b.tgt_mask & ~outside
        assert (outside & b.tgt_mask).any() and inside.any()
        assert grad[~inside].abs().max() == 0, task  # outside the space or padding
        assert grad[inside].abs().sum() > 0, task


def test_labels_outside_the_space_do_not_change_the_loss(model, events, histories, config):
    b = labelled_batch(events, histories, config)
    col = config.fm_tasks.index("long_view")
    with torch.no_grad():
        tae = model(b)
        total, losses = model.loss(b, tae)
        video = b.tgt_surface == config.surfaces.index("video")
        b.labels[..., col][video] = 1.0  # a label where the task does not apply
        total2, losses2 = model.loss(b, tae)
    assert torch.equal(losses["long_view"], losses2["long_view"])
    assert torch.equal(total, total2)


def test_task_weights_scale_the_total(model, events, histories, config):
    b = labelled_batch(events, histories, config)
    weighted = FoundationModel(
        FMConfig.from_dict({**config.to_dict(), "task_weights": {"click": 3.0, "like": 0.0}})
    )
    weighted.load_state_dict(model.state_dict())
    with torch.no_grad():
        tae = model(b)
        total, losses = model.loss(b, tae)
        total_w, _ = weighted.loss(b, tae)
    expected = total + 2.0 * losses["click"] - losses["like"]
    torch.testing.assert_close(total_w, expected)
