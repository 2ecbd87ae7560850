"""Component-wise weight sync: deltas of the most-updated 30%, digests, row-wise tables, and
the transport (files + a real Redis stream) with recovery from lost or mismatched deltas."""

from __future__ import annotations

import copy
import io
import json
import uuid

import numpy as np
import pytest
import torch

from fm import FMConfig, FoundationModel, TAEEngine, UserHistories
from fm.batching import Requests, random_batch
from fm.history import timestamps_us
from fm.sync import (
    INDEX_BYTES,
    Delta,
    DeltaMismatch,
    Snapshot,
    SyncedState,
    SyncFormatError,
    SyncTracker,
    apply_delta,
    apply_updates,
    plan_delta,
    state_digest,
    state_nbytes,
    tae_state,
)
from fm.testing import toy_config_kwargs, toy_events
from store_bridge.fm_sync import SyncConflict, SyncPublisher, SyncReader
from store_bridge.redis_server import redis_client
from store_bridge.repo import FeatureRepo

N_ITEMS = 40


@pytest.fixture(scope="module")
def events():
    return toy_events(n_users=8, n_items=N_ITEMS, n_requests=200, n_candidates=4, seed=11)


@pytest.fixture(scope="module")
def config():
    return FMConfig.small(**toy_config_kwargs(N_ITEMS), max_history=24)


@pytest.fixture(scope="module")
def histories(events, config):
    return UserHistories.from_events(events, config.surfaces)


class Trainer:
    """A FoundationModel under AdamW over the toy log's request batches, as the FM trainer."""

    def __init__(self, config, events, histories, seed=0):
        torch.manual_seed(seed)
        self.model = FoundationModel(config)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.requests = Requests.from_events(events, config)
        self.histories, self.config, self.step = histories, config, 0

    def train(self, steps: int, batch: int = 8) -> None:
        self.model.train()
        for _ in range(steps):
            lo = (self.step * batch) % (len(self.requests) - batch)
            b = self.requests.batch(lo, lo + batch, self.histories, self.config)
            loss, _ = self.model.loss(b, self.model(b))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.step += 1
        self.model.eval()


def serving_model(config, state) -> FoundationModel:
    """What the serving tier holds: the TAE path only, loaded with `state`."""
    m = FoundationModel(config, with_heads=False)
    m.load_state_dict(state)
    return m.eval()


def taes(model, histories, events) -> np.ndarray:
    rng = np.random.default_rng(3)
    n = 40
    ts = timestamps_us(events["event_timestamp"])
    return TAEEngine(model, histories).compute(
        rng.integers(0, 8, n),
        rng.integers(0, N_ITEMS, n),
        np.quantile(ts, rng.uniform(0.3, 1.0, n)).astype(np.int64),
        np.asarray(["feed", "video"], dtype=object)[rng.integers(0, 2, n)],
    )


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


# ---- planning and applying ----------------------------------------------------------------------


def test_delta_ships_at_most_30_percent_and_serving_matches_the_synced_trainer(
    config, events, histories
):
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=5, snapshot_every=100)
    base = tracker.synced
    serving = serving_model(config, base.state)
    before = taes(serving, histories, events)
    t.train(5)
    delta = tracker.maybe_sync(t.model.state_dict(), t.step)
    assert isinstance(delta, Delta) and delta.seq == 1 and delta.base_digest == base.digest

    total = state_nbytes(base.state)
    assert 0 < delta.nbytes <= 0.3 * total
    # the file adds archive framing per tensor, nothing per byte
    n_parts = len(delta.tensors) + 2 * len(delta.rows) + 1
    assert len(delta.to_bytes()) <= 0.3 * total + 1024 * n_parts

    applied = apply_delta(base.state, delta)
    trainer = tae_state(t.model.state_dict())
    for name, value in delta.tensors.items():  # shipped: exactly the trainer's values
        assert torch.equal(applied[name], trainer[name]) and torch.equal(value, trainer[name])
    for name, r in delta.rows.items():
        assert torch.equal(applied[name][r.index], trainer[name][r.index])
    shipped = set(delta.tensors) | set(delta.rows)
    for name in set(base.state) - shipped:  # the rest keeps the base's values
        assert torch.equal(applied[name], base.state[name])
    # a partial sync: some updated tensors did not ship
    assert changed(trainer, base.state) - shipped
    # nothing left out would still fit in the budget (the greedy walk skips only what does not)
    left = int(0.3 * total) - delta.nbytes
    for name in changed(trainer, base.state) - shipped:
        assert trainer[name].numel() * trainer[name].element_size() > left
    # the most updated tensor per byte that fits ships
    score = {
        k: float((trainer[k].double() - base.state[k].double()).square().sum())
        / (trainer[k].numel() * 4)
        for k in changed(trainer, base.state)
        if k not in delta.rows and trainer[k].numel() * 4 <= 0.3 * total
    }
    assert max(score, key=score.get) in delta.tensors

    # both sides agree on the state and its digest; served TAEs equal the synced trainer's
    assert state_digest(applied) == delta.digest == tracker.synced.digest
    serving.load_state_dict(applied)
    synced_trainer = copy.deepcopy(t.model)
    synced_trainer.load_state_dict(tracker.synced.state, strict=False)
    served = taes(serving, histories, events)
    np.testing.assert_allclose(served, taes(synced_trainer, histories, events), atol=1e-5, rtol=0)
    assert np.abs(served - before).max() > 1e-3  # the sync changed what serving computes
    assert np.abs(served - taes(t.model, histories, events)).max() > 1e-5  # partial, not full


def test_fraction_one_reproduces_the_trainer_exactly(config, events, histories):
    t = Trainer(config, events, histories)
    base = tae_state(t.model.state_dict())
    t.train(4)
    trainer = tae_state(t.model.state_dict())
    delta = plan_delta(base, t.model.state_dict(), fraction=1.0)
    applied = apply_delta(base, delta)
    assert set(trainer) == set(applied) and not changed(trainer, applied)
    assert delta.digest == state_digest(trainer)
    np.testing.assert_array_equal(
        taes(serving_model(config, applied), histories, events), taes(t.model, histories, events)
    )


def test_a_delta_on_the_wrong_base_raises_and_changes_nothing(config, events, histories):
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1)
    base = tracker.synced
    t.train(1)
    first = tracker.maybe_sync(t.model.state_dict(), t.step)
    t.train(1)
    second = tracker.maybe_sync(t.model.state_dict(), t.step)
    with pytest.raises(DeltaMismatch) as e:
        apply_delta(base.state, second)  # skips `first`
    msg = str(e.value)
    assert "\n" not in msg and base.digest in msg and second.base_digest in msg
    assert state_digest(base.state) == base.digest  # the input was not touched
    # applied in order they chain; apply_updates refuses the same skip
    after = apply_updates(base, [first, second])
    assert (after.seq, after.digest) == (2, tracker.synced.digest)
    with pytest.raises(DeltaMismatch):
        apply_updates(base, [second])


def test_a_damaged_delta_is_refused_after_apply(config, events, histories):
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1)
    base = tracker.synced
    t.train(1)
    delta = tracker.maybe_sync(t.model.state_dict(), t.step)
    name = next(iter(delta.tensors))
    bad = Delta(
        delta.seq,
        delta.base_digest,
        delta.digest,
        {**delta.tensors, name: delta.tensors[name] + 1.0},
        delta.rows,
    )
    with pytest.raises(DeltaMismatch, match="promises"):
        apply_delta(base.state, bad)


def test_wire_format_round_trips_and_refuses_foreign_bytes(config, events, histories):
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1)
    snap = tracker.base_snapshot()
    t.train(1)
    delta = tracker.maybe_sync(t.model.state_dict(), t.step)
    back = Delta.from_bytes(delta.to_bytes())
    assert (back.seq, back.base_digest, back.digest, back.step) == (
        delta.seq,
        delta.base_digest,
        delta.digest,
        delta.step,
    )
    assert apply_delta(snap.state, back).keys() == snap.state.keys()
    assert Snapshot.from_bytes(snap.to_bytes()).digest == snap.digest

    with pytest.raises(SyncFormatError, match="expected a delta"):
        Delta.from_bytes(snap.to_bytes())
    with pytest.raises(SyncFormatError, match="not a PyTorch archive"):
        Delta.from_bytes(b"not a file")
    buf = io.BytesIO()
    torch.save({"format": "foundex-fm-sync/1", "kind": "delta", "x": Trainer}, buf)
    with pytest.raises(SyncFormatError, match="Python objects"):
        Delta.from_bytes(buf.getvalue())
    state = {k: v.clone() for k, v in snap.state.items()}
    next(iter(state.values())).add_(1.0)
    tampered = Snapshot(snap.seq, snap.digest, state).to_bytes()
    with pytest.raises(SyncFormatError, match="do not match"):
        Snapshot.from_bytes(tampered)


def test_bad_inputs_are_named():
    a = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="fraction"):
        plan_delta(a, a, fraction=0.0)
    with pytest.raises(ValueError, match="lacks"):
        plan_delta(a, {})
    with pytest.raises(ValueError, match="new FM version"):
        plan_delta(a, {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="non-finite"):
        plan_delta(a, {"w": torch.tensor([0.0, float("nan"), 0.0])})
    with pytest.raises(ValueError, match="row_wise"):
        plan_delta(a, a, row_wise=["w"])


# ---- row-wise embedding tables ------------------------------------------------------------------


def test_only_the_changed_rows_of_a_big_table_ship(config):
    cfg = FMConfig.small(**{**toy_config_kwargs(N_ITEMS), "n_items": 5000}, max_history=8)
    torch.manual_seed(0)
    model = FoundationModel(cfg)
    tracker = SyncTracker.for_model(model, every_steps=1, fraction=0.3)
    base = tracker.synced
    table = "embed.item.weight"
    assert table in tracker.row_wise

    # one plain-SGD step on a batch of a few items: only their rows of the table move
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = random_batch(cfg, [6, 4], 3, seed=1)
    pool = torch.tensor([7, 99, 1234, 4321])
    b.hist_item = pool[b.hist_item % 4] * (b.hist_item >= 0)
    b.tgt_item = pool[b.tgt_item % 4]
    b.labels = torch.ones(2, 3, len(cfg.fm_tasks))
    loss, _ = model.loss(b, model(b))
    loss.backward()
    opt.step()
    touched = (model.embed.item.weight.detach() != base.state[table]).any(dim=1).nonzero()[:, 0]
    assert 0 < len(touched) <= 4

    delta = tracker.maybe_sync(model.state_dict(), 1)
    assert table not in delta.tensors
    assert torch.equal(delta.rows[table].index, touched)
    assert delta.rows[table].values.shape == (len(touched), cfg.item_width)
    assert delta.nbytes < 0.3 * state_nbytes(base.state)
    applied = apply_delta(base.state, delta)
    assert torch.equal(applied[table], model.embed.item.weight.detach())

    # a table where only two rows changed, nothing else: exactly those two rows ship
    edited = {k: v.clone() for k, v in base.state.items()}
    edited[table][[17, 3]] += 0.5
    only = plan_delta(base.state, edited, row_wise=[table])
    assert not only.tensors and list(only.rows) == [table]
    assert only.rows[table].index.tolist() == [3, 17]
    assert only.nbytes == 2 * (cfg.item_width * 4 + INDEX_BYTES)
    assert apply_delta(base.state, only)[table].equal(edited[table])


# ---- transport: files + Redis stream ------------------------------------------------------------


@pytest.fixture
def channel(tmp_path, redis_url):
    client = redis_client(redis_url, timeout=5)
    repo = FeatureRepo(tmp_path / "repo")
    project = f"sync{uuid.uuid4().hex[:8]}"
    pub = SyncPublisher(repo, client, "v1", project=project, keep_snapshots=2)
    reader = SyncReader(repo, client, "v1", project=project)
    yield pub, reader
    client.close()


class Server:
    """A serving tier's view: a SyncedState it replaces whole after each poll."""

    def __init__(self, reader: SyncReader, start: SyncedState) -> None:
        self.reader, self.now = reader, start

    def catch_up(self) -> list:
        updates = self.reader.poll(self.now.digest, self.now.seq)
        self.now = apply_updates(self.now, updates)
        return updates


def test_serving_follows_deltas_and_snapshots(config, events, histories, channel):
    pub, reader = channel
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=2, snapshot_every=3)
    pub.publish(tracker.base_snapshot())
    server = Server(reader, tracker.synced)
    assert server.catch_up() == [] and reader.last_problem is None

    kinds = []
    for _ in range(4):
        t.train(2)
        update = tracker.maybe_sync(t.model.state_dict(), t.step)
        ann = pub.publish(update)
        assert pub.publish(update) == ann  # a retried publish is a no-op
        kinds.append([u.kind for u in server.catch_up()])
        assert (server.now.seq, server.now.digest) == (tracker.seq, tracker.synced.digest)
    assert kinds == [["delta"], ["delta"], ["snapshot"], ["delta"]]
    assert reader.recoveries == 0
    # a second trainer (or a restarted one that did not resume) cannot publish an older seq
    with pytest.raises(SyncConflict):
        pub.publish(Snapshot(2, tracker.synced.digest, tracker.synced.state))
    # what serving computes is the synced trainer's
    synced_trainer = copy.deepcopy(t.model)
    synced_trainer.load_state_dict(tracker.synced.state, strict=False)
    np.testing.assert_allclose(
        taes(serving_model(config, server.now.state), histories, events),
        taes(synced_trainer, histories, events),
        atol=1e-5,
        rtol=0,
    )


def publish_syncs(t: Trainer, tracker: SyncTracker, pub: SyncPublisher, n: int) -> list:
    out = []
    for _ in range(n):
        t.train(1)
        update = tracker.maybe_sync(t.model.state_dict(), t.step)
        out.append((update, pub.publish(update)))
    return out


def test_a_lost_delta_file_is_recovered_through_the_last_snapshot(
    config, events, histories, channel
):
    pub, reader = channel
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1, snapshot_every=3)
    pub.publish(tracker.base_snapshot())
    server = Server(reader, tracker.synced)
    publish_syncs(t, tracker, pub, 1)
    server.catch_up()
    assert server.now.seq == 1

    done = publish_syncs(t, tracker, pub, 4)  # 2 delta, 3 snapshot, 4 delta, 5 delta
    assert [u.kind for u, _ in done] == ["delta", "snapshot", "delta", "delta"]
    (pub.repo.data / done[0][1].path).unlink()  # delta 2 is lost
    got = server.catch_up()
    assert [(u.kind, u.seq) for u in got] == [("snapshot", 3), ("delta", 4), ("delta", 5)]
    assert "delta 2" in reader.last_problem and "missing" in reader.last_problem
    assert (server.now.seq, server.now.digest) == (5, tracker.synced.digest)
    assert server.catch_up() == [] and reader.last_problem is None


def test_a_skipped_seq_is_detected_and_serving_never_goes_back(config, events, histories, channel):
    pub, reader = channel
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1, snapshot_every=3)
    pub.publish(tracker.base_snapshot())
    server = Server(reader, tracker.synced)
    publish_syncs(t, tracker, pub, 4)  # 1, 2, snapshot 3, 4
    server.catch_up()
    assert server.now.seq == 4

    (_, lost), _ = publish_syncs(t, tracker, pub, 2)  # delta 5, snapshot 6
    pub.stream.client.xdel(pub.stream.key, lost.entry_id)  # the announcement of 5 is lost
    got = server.catch_up()
    assert [(u.kind, u.seq) for u in got] == [("snapshot", 6)]
    assert "update 5 is not announced" in reader.last_problem
    assert (server.now.seq, server.now.digest) == (6, tracker.synced.digest)

    (_, lost), _ = publish_syncs(t, tracker, pub, 2)  # delta 7 (lost), delta 8
    pub.stream.client.xdel(pub.stream.key, lost.entry_id)
    # no snapshot after the gap yet: serving stays at 6 (not back, not past the gap)
    assert server.catch_up() == [] and server.now.seq == 6
    assert "update 7 is not announced" in reader.last_problem
    recoveries = reader.recoveries
    assert server.catch_up() == [] and reader.recoveries == recoveries  # remembered: no re-read
    publish_syncs(t, tracker, pub, 2)  # snapshot 9, delta 10
    assert [u.seq for u in server.catch_up()] == [9, 10]
    assert (server.now.seq, server.now.digest) == (10, tracker.synced.digest)


def test_a_state_off_the_chain_recovers_and_load_state_rebuilds(config, events, histories, channel):
    pub, reader = channel
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1, snapshot_every=3)
    pub.publish(tracker.base_snapshot())
    publish_syncs(t, tracker, pub, 5)
    # a server whose weights are not the base of the next delta (e.g. damaged in memory)
    wrong = {k: v.clone() for k, v in tracker.synced.state.items()}
    next(iter(wrong.values())).add_(1.0)
    server = Server(reader, SyncedState(wrong, 4, state_digest(wrong)))
    got = server.catch_up()
    assert [(u.kind, u.seq) for u in got] == [("snapshot", 3), ("delta", 4), ("delta", 5)]
    assert "applies to state" in reader.last_problem
    assert server.now.digest == tracker.synced.digest

    # a cold start (or a trainer resuming its tracker) rebuilds the latest published state
    rebuilt = reader.load_state()
    assert (rebuilt.seq, rebuilt.digest) == (5, tracker.synced.digest)
    assert not changed(rebuilt.state, tracker.synced.state)


def test_retention_keeps_the_last_snapshots_and_what_follows(config, events, histories, channel):
    pub, reader = channel
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1, snapshot_every=2)
    pub.publish(tracker.base_snapshot())
    publish_syncs(t, tracker, pub, 7)  # snapshots 0, 2, 4, 6
    assert [a.seq for a in reader.announcements()] == [4, 5, 6, 7]
    files = sorted(p.name for p in pub.dir.glob("*.pt"))
    assert files == ["delta-5.pt", "delta-7.pt", "snapshot-4.pt", "snapshot-6.pt"]
    # a server far behind (seq 1, trimmed away) recovers from the latest snapshot
    server = Server(reader, SyncedState({}, 1, "0" * 64))
    assert [u.seq for u in server.catch_up()] == [6, 7]
    assert server.now.digest == tracker.synced.digest


def test_a_damaged_file_or_a_wrong_digest_ends_at_the_trainers_state(
    config, events, histories, channel
):
    pub, reader = channel
    t = Trainer(config, events, histories)
    tracker = SyncTracker.for_model(t.model, every_steps=1, snapshot_every=3)
    start = tracker.synced
    pub.publish(tracker.base_snapshot())
    (_, first), (second, _) = publish_syncs(t, tracker, pub, 2)
    # delta 1's file replaced by other, well-formed bytes: caught by the announced checksum
    (pub.repo.data / first.path).write_bytes(second.to_bytes())
    got = reader.poll(start.digest, 0)
    assert got == [] and "damaged" in reader.last_problem  # no snapshot after it yet: stay
    publish_syncs(t, tracker, pub, 1)  # snapshot 3
    (snap3,) = reader.poll(start.digest, 0)
    assert isinstance(snap3, Snapshot) and snap3.seq == 3

    # a server whose digest is right but whose weights are not: the delta's result check
    # fails, and catch_up rebuilds from the snapshot instead of serving the mix
    publish_syncs(t, tracker, pub, 1)  # delta 4
    wrong = {k: v + 1e-3 for k, v in snap3.state.items()}
    lying = SyncedState(wrong, 3, snap3.digest)
    caught = reader.catch_up(lying)
    assert "promises" in reader.last_problem
    assert (caught.seq, caught.digest) == (4, tracker.synced.digest)
    assert not changed(caught.state, tracker.synced.state)
    assert reader.catch_up(caught) is caught  # current: nothing to do


# ---- the benchmark's measurement (figures only checked for shape: no timing asserts) ---------


def test_sync_bench_measures_a_row_sparse_delta_against_a_snapshot():
    from fm.sync_bench import SyncBenchCase, bench_sync, format_table, standard_cases

    big = standard_cases(big_items=50_000)[-1]
    cases = [standard_cases()[0], SyncBenchCase("50k", big.config, optimizer="rowwise")]
    result = bench_sync(cases, steps_per_sync=2, repeats=1, say=lambda s: None)
    json.dumps(result)  # the JSON line
    assert [(r["model"], r["kind"]) for r in result["rows"]] == [
        ("tiny", "delta"), ("tiny", "snapshot"), ("50k", "delta"), ("50k", "snapshot")
    ]  # fmt: skip
    sparse = result["models"]["50k"]
    # row-sparse steps: every changed item row ships, and no other
    assert 0 < sparse["item_rows_shipped"] == sparse["item_rows_changed"] < 50_000
    assert sparse["delta_file_bytes"] < 0.3 * sparse["snapshot_file_bytes"]
    for r in result["rows"]:
        assert r["file_bytes"] >= r["payload_bytes"] > 0
        assert all(r[k] >= 0 for k in ("plan_s", "serialize_s", "write_s", "read_s", "apply_s"))
    table = format_table(result)
    assert "50k" in table and "snapshot" in table
