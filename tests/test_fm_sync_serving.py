"""Weight sync reaching the FM serving and logging tiers, on a real Redis: served and logged
TAEs after a sync are the trainer's synced state's, a lost delta is recovered, a request sees
the old or the new weights whole, the version listing shows the sync seq, and logged rows
carry the seq they were computed with.

Each test runs on its own copy of a small two-version repo (no `feast apply`: serving and
logging read the manifest, checkpoints and events) under a project of its own, so the sync
files under data/fm_sync/ and the Redis keys are the test's alone."""

from __future__ import annotations

import copy
import shutil
import threading
import time
import uuid

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fm import TAEEngine, load_checkpoint
from fm.batching import random_batch
from fm.sync import SyncTracker, tae_state
from store_bridge.events.schema import EVENT_TIMESTAMP, DatasetSpec, timestamps_us
from store_bridge.fm_sync import SyncPublisher
from store_bridge.fm_tier import FMTier
from store_bridge.online import RedisEmbeddingStore
from store_bridge.redis_server import redis_client
from store_bridge.repo import FeatureRepo
from store_bridge.streams.histories import OnlineHistories
from store_bridge.streams.impression_buffer import impression_batch
from store_bridge.streams.impressions import ImpressionLogConsumer
from store_bridge.streams.stream import RedisStream

ATOL = 1e-5


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory):
    from test_store_logging import make_fm_repo

    return make_fm_repo(tmp_path_factory.mktemp("sync_serving") / "repo", "sync_base")


@pytest.fixture
def setup(base_repo, tmp_path, redis_url):
    """A copy of the repo under a fresh project, its online histories backfilled, a trainer
    on v1's checkpoint and a publisher for v1."""
    repo0, events = base_repo
    shutil.copytree(repo0.path, tmp_path / "repo")
    project = f"ss_{uuid.uuid4().hex[:8]}"
    cfg_path = tmp_path / "repo" / "feature_store.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["project"] = project
    cfg_path.write_text(yaml.safe_dump(cfg))
    repo = FeatureRepo(tmp_path / "repo")
    spec = DatasetSpec.load(repo.events_dir / "spec.json")
    client = redis_client(redis_url, timeout=10)
    histories = OnlineHistories(client, project, spec.surfaces, cap=256)
    histories.backfill(events)
    version = repo.load_manifest().versions["v1"]
    trainer = Trainer(repo, version)
    pub = SyncPublisher(repo, client, "v1", project=project)
    yield {"repo": repo, "events": events, "spec": spec, "client": client,
           "histories": histories, "version": version, "trainer": trainer, "pub": pub,
           "project": project, "redis_url": redis_url}
    client.close()


class Trainer:
    """v1's checkpoint under AdamW on random request batches: a streaming trainer's weights."""

    def __init__(self, repo: FeatureRepo, version, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model, _ = load_checkpoint(version.model_path(repo))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-2)
        self.step = 0

    def train(self, steps: int) -> None:
        cfg = self.model.config
        self.model.train()
        for _ in range(steps):
            g = torch.Generator().manual_seed(100 + self.step)
            b = random_batch(cfg, [cfg.max_history] * 8, 4, seed=100 + self.step)
            b.labels = torch.randint(0, 2, (*b.tgt_item.shape, len(cfg.fm_tasks)), generator=g)
            b.labels = b.labels.float()
            loss, _ = self.model.loss(b, self.model(b))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.step += 1
        self.model.eval()


def synced_taes(trainer: Trainer, state: dict, histories: OnlineHistories, user: int,
                items: np.ndarray, surface: str, ts_us: int) -> np.ndarray:
    """The TAEs the trainer's synced state computes for one request (a copy of the trainer's
    model holding the synced weights, over the same online history)."""
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(state, strict=False)
    hist, _ = histories.user_histories(user)
    return TAEEngine(model.eval(), hist).compute_request(user, ts_us, surface, items)


def request(setup) -> tuple[int, np.ndarray, str, int]:
    events = setup["events"]
    user = int(events["user_id"].iloc[0])
    ts = int(timestamps_us(events[EVENT_TIMESTAMP]).max()) + 3_600_000_000
    return user, np.arange(0, 20, 3), setup["spec"].surfaces[0], ts


def served(tier: FMTier, setup, req) -> tuple[np.ndarray, int]:
    user, items, surface, ts = req
    got = tier.compute(setup["version"], user, items, surface, ts)
    assert not got.unknown_user and len(got.positions) == len(items)
    return got.taes, got.sync_seq


def publish(setup, tracker: SyncTracker, steps: int) -> object:
    t = setup["trainer"]
    t.train(steps)
    update = tracker.sync(t.model.state_dict(), t.step)
    setup["pub"].publish(update)
    return update


def test_served_taes_after_a_sync_are_the_trainers_synced_state(setup):
    t, histories = setup["trainer"], setup["histories"]
    req = request(setup)
    tier = FMTier(setup["repo"], histories)
    published, seq = served(tier, setup, req)  # nothing synced: the published checkpoint
    assert seq == 0 and tier.sync_once() == {"v1": 0}
    assert tier.sync_state(setup["version"]).digest is None
    np.testing.assert_allclose(
        published, synced_taes(t, tae_state(t.model.state_dict()), histories, *req), atol=ATOL,
        rtol=0,
    )

    tracker = SyncTracker.for_model(t.model, snapshot_every=3, fraction=0.3)
    setup["pub"].publish(tracker.base_snapshot())
    kinds = []
    for _ in range(4):  # delta 1, delta 2, snapshot 3, delta 4
        kinds.append(publish(setup, tracker, 3).kind)
        assert tier.sync_once() == {"v1": tracker.seq}
        assert tier.served_seqs() == {"v1": tracker.seq}  # what /metrics reports
        state = tier.sync_state(setup["version"])
        assert (state.seq, state.digest) == (tracker.seq, tracker.synced.digest)
        got, seq = served(tier, setup, req)
        assert seq == tracker.seq
        # the user's history was cached under the old weights: the swap must have dropped it
        want = synced_taes(t, tracker.synced.state, histories, *req)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        assert np.abs(got - published).max() > 1e-3  # the sync changed what is served
    assert kinds == ["delta", "delta", "snapshot", "delta"]
    assert tier.sync_state(setup["version"]).reader.recoveries == 0
    # partial deltas: the synced state is not the trainer's live weights
    live = tae_state(t.model.state_dict())
    assert any(not torch.equal(live[k], tracker.synced.state[k]) for k in live)


def test_a_lost_delta_is_detected_and_serving_ends_at_the_trainers_digest(setup):
    t, histories, pub = setup["trainer"], setup["histories"], setup["pub"]
    req = request(setup)
    tier = FMTier(setup["repo"], histories)
    tracker = SyncTracker.for_model(t.model, snapshot_every=3, fraction=0.3)
    pub.publish(tracker.base_snapshot())
    publish(setup, tracker, 2)  # delta 1
    served(tier, setup, req)  # loads the engine, caught up at once: seq 1
    assert tier.sync_state(setup["version"]).seq == 1

    for _ in range(4):  # delta 2, snapshot 3, delta 4, delta 5
        publish(setup, tracker, 2)
    lost = [a for a in pub.announcements() if a.seq == 2][0]
    (setup["repo"].data / lost.path).unlink()
    assert tier.sync_once() == {"v1": 5}
    state = tier.sync_state(setup["version"])
    assert state.digest == tracker.synced.digest
    assert "delta 2" in state.reader.last_problem and state.reader.recoveries == 1
    got, seq = served(tier, setup, req)
    assert seq == 5
    np.testing.assert_allclose(
        got, synced_taes(t, tracker.synced.state, histories, *req), atol=ATOL, rtol=0
    )


def test_a_delta_on_another_base_is_refused_and_recovered_from_the_snapshot(setup):
    """Serving holds weights that are not the base the trainer's deltas were planned on
    (another checkpoint): the delta is refused, the snapshot loaded instead."""
    t, histories, pub = setup["trainer"], setup["histories"], setup["pub"]
    req = request(setup)
    t.train(3)  # the trainer's seq 0 is no longer the published checkpoint
    tracker = SyncTracker.for_model(t.model, snapshot_every=10, fraction=0.3)
    pub.publish(tracker.base_snapshot())
    publish(setup, tracker, 2)  # delta 1, planned on the trainer's seq 0
    tier = FMTier(setup["repo"], histories)
    got, seq = served(tier, setup, req)
    state = tier.sync_state(setup["version"])
    assert seq == 1 and state.digest == tracker.synced.digest
    assert state.reader.recoveries == 1 and "delta 1" in state.reader.last_problem
    np.testing.assert_allclose(
        got, synced_taes(t, tracker.synced.state, histories, *req), atol=ATOL, rtol=0
    )


def test_a_request_during_a_swap_sees_the_old_or_the_new_weights_whole(setup):
    t, histories = setup["trainer"], setup["histories"]
    req = request(setup)
    tier = FMTier(setup["repo"], histories)
    old, _ = served(tier, setup, req)
    tracker = SyncTracker.for_model(t.model, snapshot_every=10, fraction=1.0)
    setup["pub"].publish(tracker.base_snapshot())
    publish(setup, tracker, 3)
    new = synced_taes(t, tracker.synced.state, histories, *req)
    assert np.abs(new - old).max() > 1e-3
    eng = tier._engines[("v1", setup["version"].digest)]
    before = eng.engine.model

    # while a request holds the engine, the swap (built aside) waits for it
    with eng.lock:
        syncer = threading.Thread(target=tier.sync_once)
        syncer.start()
        time.sleep(0.5)
        assert eng.engine.model is before and eng.sync.seq == 0
    syncer.join(timeout=30)
    assert eng.engine.model is not before and eng.sync.seq == 1

    # requests racing a swap back and forth: each one entirely old (seq 0) or new (seq 1)
    want = {0: old, 1: new}
    seen: list[tuple[np.ndarray, int]] = []
    stop = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            seen.append(served(tier, setup, req))

    worker = threading.Thread(target=requests)
    worker.start()
    for _ in range(6):
        with eng.lock:  # back to the published weights (seq 0), then caught up again
            eng.sync.synced = None
            eng.engine.model = before
            eng.engine.cache.invalidate()
        tier.sync_once()
    stop.set()
    worker.join(timeout=30)
    assert seen
    for taes, seq in seen:
        np.testing.assert_allclose(taes, want[seq], atol=ATOL, rtol=0)


def test_the_listing_shows_each_versions_sync_seq_and_time(setup):
    from conftest import LiveServer

    from api.app import create_app
    from api.services.context import ServiceContext
    from api.services.lifecycle import list_versions
    from api.settings import Settings

    t, pub = setup["trainer"], setup["pub"]
    settings = Settings(repo=setup["repo"].path, redis_url=setup["redis_url"])
    ctx = ServiceContext(settings, setup["redis_url"])
    listed = {i.entry.version: i.sync for i in list_versions(ctx).versions}
    assert listed == {"v1": None, "v2": None}
    tracker = SyncTracker.for_model(t.model, snapshot_every=10)
    pub.publish(tracker.base_snapshot())
    publish(setup, tracker, 2)
    publish(setup, tracker, 2)
    listed = {i.entry.version: i.sync for i in list_versions(ctx).versions}
    assert listed["v2"] is None and (listed["v1"].seq, listed["v1"].kind) == (2, "delta")
    latest = pub.latest()
    assert pd.Timestamp(listed["v1"].time).value // 1000 // 1000 == latest.time_us // 1000
    ctx.close()

    with LiveServer(create_app(settings, setup["redis_url"])) as server:
        body = httpx.get(f"{server.url}/v1/fm-versions").json()
    by = {v["version"]: v for v in body["versions"]}
    assert by["v1"]["sync_seq"] == 2 and by["v1"]["sync_time"] == listed["v1"].time
    assert by["v2"]["sync_seq"] is None and by["v2"]["sync_time"] is None


def test_logged_rows_carry_the_sync_seq_they_were_computed_with(setup):
    repo, histories, t = setup["repo"], setup["histories"], setup["trainer"]
    client, project = setup["client"], setup["project"]
    stream = RedisStream(client, project, "impressions", dedup_s=0, groups=("logging",))
    stream.ensure_groups()
    consumer = ImpressionLogConsumer(stream, repo, RedisEmbeddingStore(client, project), histories)
    user, items, surface, ts = request(setup)

    stream.append(impression_batch(user, items, ts, surface, fm_version="v1"))
    consumer.drain()
    tracker = SyncTracker.for_model(t.model, snapshot_every=10, fraction=0.3)
    setup["pub"].publish(tracker.base_snapshot())
    publish(setup, tracker, 3)
    publish(setup, tracker, 3)
    later = ts + 60_000_000
    stream.append(impression_batch(user, items, later, surface, fm_version="v1"))
    consumer.drain()

    files = sorted(repo.tae_dir("v1").glob("*/*.parquet"))
    rows = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    rows["ts"] = timestamps_us(rows[EVENT_TIMESTAMP])
    assert rows["sync_seq"].dtype == np.int64
    assert set(rows.loc[rows["ts"] == ts, "sync_seq"]) == {0}
    synced = rows[rows["ts"] == later].sort_values("item_id")
    assert set(synced["sync_seq"]) == {2} and len(synced) == len(items)
    want = synced_taes(t, tracker.synced.state, histories, user, items, surface, later)
    np.testing.assert_allclose(np.stack(synced["embedding"].to_numpy()), want, atol=ATOL, rtol=0)
    # v2 was never synced: its rows say 0
    v2 = [pq.read_table(f, columns=["sync_seq"]) for f in repo.tae_dir("v2").glob("*/*.parquet")]
    assert v2 and {s for tb in v2 for s in tb.column("sync_seq").to_pylist()} == {0}


def test_the_manifest_records_each_versions_latest_sync(setup):
    """The manifest file (the repo's record, read without Redis) holds the latest published
    seq and time; a version never synced carries neither key."""
    from api.services.context import ServiceContext
    from api.services.lifecycle import list_versions
    from api.settings import Settings

    repo, t, pub = setup["repo"], setup["trainer"], setup["pub"]
    tracker = SyncTracker.for_model(t.model, snapshot_every=10)
    pub.publish(tracker.base_snapshot())
    raw = yaml.safe_load(repo.manifest_path.read_text())["versions"]
    assert raw["v1"]["sync_seq"] == 0 and "sync_seq" not in raw["v2"]
    publish(setup, tracker, 2)
    publish(setup, tracker, 2)
    latest = pub.latest()
    entry = repo.load_manifest().versions["v1"]
    assert entry.sync_seq == latest.seq == 2
    assert pd.Timestamp(entry.sync_time).value // 1_000_000 == latest.time_us // 1000
    assert "sync_seq" not in yaml.safe_load(repo.manifest_path.read_text())["versions"]["v2"]

    # The announcements gone (a wiped Redis): the listing falls back on the manifest's record.
    setup["client"].delete(pub.stream.key)
    settings = Settings(repo=repo.path, redis_url=setup["redis_url"])
    ctx = ServiceContext(settings, setup["redis_url"])
    listed = {i.entry.version: i.sync for i in list_versions(ctx).versions}
    ctx.close()
    assert (listed["v1"].seq, listed["v1"].time, listed["v1"].kind) == (2, entry.sync_time, None)
    assert listed["v2"] is None


def test_a_sync_channel_of_an_unpublished_version_records_nothing(setup):
    from store_bridge.versions import VersionRegistry

    repo = setup["repo"]
    before = repo.manifest_path.read_bytes()
    assert VersionRegistry(repo).record_sync("v9", 3, "2026-01-01T00:00:00.000+00:00") is False
    assert repo.manifest_path.read_bytes() == before
