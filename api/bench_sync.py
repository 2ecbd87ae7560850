"""`foundex bench sync`: weight-sync deltas against full snapshots (fm.sync_bench), the FM
serving tier's apply time and staleness (trainer step -> serving serves the new digest), and
the progressive NE of what serving holds when a fraction of the weights is synced vs all."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def train_steps(model, opt, cfg, steps: int, seed: int) -> None:
    """`steps` AdamW steps on random request batches with random labels (a streaming trainer's
    weights moving; what they learn does not matter here)."""
    import torch

    from fm.batching import random_batch

    model.train()
    for k in range(steps):
        b = random_batch(cfg, [cfg.max_history] * 16, 6, seed=seed + k)
        g = torch.Generator().manual_seed(seed + k)
        b.labels = torch.randint(0, 2, (*b.tgt_item.shape, len(cfg.fm_tasks)), generator=g).float()
        loss, _ = model.loss(b, model(b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def serving_case(label, config, client, root: Path, *, updates: int, steps: int,
                       fraction: float, interval_s: float) -> dict:
    """One FM in a scratch repo: its checkpoint as version v1, one user's history in Redis, a
    FMTier with its background check every `interval_s` s. Publishes `updates` deltas, each
    after `steps` trainer steps -> apply time in the tier and staleness (end of the trainer
    step -> the tier serves the new digest)."""
    import uuid

    import numpy as np
    import pandas as pd
    import torch

    from fm import FoundationModel, save_checkpoint
    from fm.sync import SyncTracker
    from store_bridge.fm_sync import SyncPublisher
    from store_bridge.fm_tier import FMTier
    from store_bridge.repo import FeatureRepo, FMVersion
    from store_bridge.streams.histories import OnlineHistories

    torch.manual_seed(0)
    project = f"benchsync_{uuid.uuid4().hex[:8]}"
    repo = FeatureRepo(root / project)
    (repo.data / "checkpoints").mkdir(parents=True)
    model = FoundationModel(config).eval()
    save_checkpoint(model, repo.data / "checkpoints" / "v1.pt")
    version = FMVersion(version="v1", dim=config.d_model, checkpoint="checkpoints/v1.pt",
                        digest="bench", training_window=("2026-01-01", "2026-01-02"),
                        created_at="2026-01-02")
    histories = OnlineHistories(client, project, list(config.surfaces), cap=config.max_history)
    n = config.max_history
    histories.add(pd.DataFrame({
        "user_id": np.ones(n, np.int64), "item_id": np.arange(n, dtype=np.int64) % config.n_items,
        "event_timestamp": pd.to_datetime(1_767_225_600_000_000 + np.arange(n) * 60_000_000,
                                          unit="us", utc=True).astype("datetime64[us, UTC]"),
        "surface": [config.surfaces[i % len(config.surfaces)] for i in range(n)],
        "action": np.zeros(n, np.int16), "event_id": [f"b{i}" for i in range(n)],
    }))
    tier = FMTier(repo, histories)
    items, now = np.arange(8) % config.n_items, 1_767_225_600_000_000 + 86_400_000_000
    tier.compute(version, 1, items, config.surfaces[0], now)  # loads the engine
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    tracker = SyncTracker.for_model(model, fraction=fraction, snapshot_every=1 << 30)
    pub = SyncPublisher(repo, client, "v1", project=project)
    pub.publish(tracker.base_snapshot())
    tier.start_sync(interval_s)
    stale, publish_s, update_s, swap_s = [], [], [], []
    try:
        for k in range(updates):
            train_steps(model, opt, config, steps, seed=1000 * k)
            t0 = time.perf_counter()  # the trainer's step is done
            update = tracker.sync(model.state_dict(), (k + 1) * steps)
            pub.publish(update)
            publish_s.append(time.perf_counter() - t0)
            state = tier.sync_state(version)
            while state.digest != update.digest:
                if time.perf_counter() - t0 > 60 + 10 * interval_s:
                    raise RuntimeError(f"{label}: serving did not reach sync {update.seq}: "
                                       f"{state.reader.last_problem or state.last_error}")
                time.sleep(0.002)
            stale.append(time.perf_counter() - t0)
            update_s.append(state.last_update_s)
            swap_s.append(state.last_swap_s)
        got = tier.compute(version, 1, items, config.surfaces[0], now)
        assert got.sync_seq == tracker.seq  # served with the synced weights
    finally:
        tier.stop_sync()
        for key in client.scan_iter(f"foundex:*{project}*"):
            client.delete(key)
    return {
        "model": label, "updates": updates, "steps_per_sync": steps, "interval_s": interval_s,
        "publish_s": float(np.median(publish_s)), "apply_s": float(np.median(update_s)),
        "swap_s": float(np.median(swap_s)), "staleness_s": float(np.median(stale)),
        "staleness_max_s": float(np.max(stale)),
    }


def ne_run(*, steps: int, sync_every: int, fractions: tuple[float, ...], seed: int) -> dict:
    """A tiny FM streaming over a toy log, a few hundred request batches: before learning from
    each batch, the main-task NE of the trainer (live) and of what serving holds under each
    sync fraction (TAE path = that fraction's synced state, task heads = the trainer's at the
    last sync: heads are a few hundred bytes and serving needs them to predict). Paired: one
    trainer, one SyncTracker per fraction."""
    import copy

    import torch

    from fm import FMConfig, FoundationModel, UserHistories
    from fm.batching import Requests
    from fm.metrics import NEAccumulator
    from fm.sync import SyncTracker
    from fm.testing import toy_config_kwargs, toy_events

    n_items, batch = 400, 16
    events = toy_events(n_users=120, n_items=n_items, n_requests=(steps + 1) * batch,
                        n_candidates=6, seed=seed)
    config = FMConfig.small(**toy_config_kwargs(n_items), max_history=32)
    histories = UserHistories.from_events(events, config.surfaces)
    requests = Requests.from_events(events, config)
    torch.manual_seed(seed)
    model = FoundationModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    trackers = {f: SyncTracker.for_model(model, every_steps=sync_every, snapshot_every=1 << 30,
                                         fraction=f) for f in fractions}
    serving = {f: copy.deepcopy(model).eval() for f in fractions}
    acc = {name: NEAccumulator() for name in ["live", *fractions]}
    n_batches = min(steps, len(requests) // batch)
    for step in range(n_batches):
        b = requests.batch(step * batch, (step + 1) * batch, histories, config)
        with torch.no_grad():
            for name, m in [("live", model.eval()), *serving.items()]:
                outs = m.task_outputs(b, m(b))
                for t in config.main_tasks:
                    logits, y = outs[t]
                    acc[name].update(y.numpy(), torch.sigmoid(logits).numpy())
        model.train()
        loss, _ = model.loss(b, model(b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for f, tracker in trackers.items():
            if tracker.maybe_sync(model.state_dict(), step + 1) is not None:
                heads = {k: v for k, v in model.state_dict().items() if k not in tracker.synced.state}
                serving[f].load_state_dict({**tracker.synced.state, **heads})
    return {
        "steps": n_batches, "batch_requests": batch, "sync_every": sync_every,
        "ne": {("live" if k == "live" else f"sync {k:g}"): round(a.value(), 5) for k, a in acc.items()},
    }




def run(
    *, fraction: float, steps_per_sync: int, repeats: int, demo: bool, big_items: int,
    updates: int, interval: float, ne_steps: int, redis_url: str | None,
    say: Callable[[str], None],
) -> dict:  # fmt: skip
    """The whole benchmark -> the result dict (`format_report` prints it). Uses `redis_url`,
    else an embedded redis-server of its own in a temporary folder."""
    from fm.sync_bench import bench_sync, standard_cases
    from store_bridge.redis_server import EmbeddedRedis, redis_client

    fields = None
    if demo:
        from api.pipeline import DemoSize
        from store_bridge.events.synthetic import make_spec

        size = DemoSize.default()
        fields = {**make_spec(size.synthetic).fm_fields(), "max_history": size.fm_max_history}
    cases = standard_cases(fields, big_items=big_items)
    result = bench_sync(cases, steps_per_sync=steps_per_sync, fraction=fraction,
                        repeats=repeats, say=say)  # fmt: skip
    serving = []
    with tempfile.TemporaryDirectory(prefix="foundex-bench-sync-") as tmp:
        url, server = redis_url, None
        if not url:
            server = EmbeddedRedis(Path(tmp) / "redis")
            server.start()
            url = server.url
        client = redis_client(url, timeout=30)
        try:
            for case in cases:
                say(f"  {case.label}: serving apply and staleness over {updates} deltas")
                serving.append(serving_case(
                    case.label, case.config, client, Path(tmp), updates=updates,
                    steps=steps_per_sync, fraction=fraction, interval_s=interval))
        finally:
            client.close()
            if server is not None:
                server.stop()
    result["serving"] = serving
    if ne_steps:
        say(f"  NE run: {ne_steps} streaming steps, sync every {steps_per_sync}")
        result["ne_run"] = ne_run(steps=ne_steps, sync_every=steps_per_sync,
                                  fractions=(fraction, 1.0), seed=0)
    return result


def format_report(result: dict) -> str:
    """The tables of a `run` result (bytes and seconds per update; serving apply/staleness;
    the NE run)."""
    from fm.sync_bench import format_table

    out = [format_table(result), ""]
    head = ("model", "apply s", "swap s", "publish s", "staleness s", "max s")
    lines = [head] + [(r["model"], *(f"{r[k]:.4f}" for k in (
        "apply_s", "swap_s", "publish_s", "staleness_s", "staleness_max_s")))
        for r in result["serving"]]  # fmt: skip
    w = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for row in lines:
        out.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)))
    if "ne_run" in result:
        r = result["ne_run"]
        out.append(f"\nprogressive NE over {r['steps']} steps (sync every {r['sync_every']}): "
                   + ", ".join(f"{k} {v:.4f}" for k, v in r["ne"].items()))
    return "\n".join(out)
