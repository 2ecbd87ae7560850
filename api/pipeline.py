"""The end-to-end job behind `foundex demo`: data -> FM versions -> logging -> experts -> NE.

Every stage goes through the real parts: parquet on disk, `feast apply`, Redis in Feast's layout,
DuckDB point-in-time joins, and the same expert code the service scores with.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from api.services.context import ServiceContext
from api.services.histories import backfill_histories
from api.services.offline import log_impressions
from api.settings import Settings
from experts import (
    ExpertConfig,
    check_against_manifest,
    recent_history,
    save_expert,
    save_expert_config,
    transfer_ratio,
)
from fm import FMConfig, UserHistories, evaluate_fm, save_checkpoint, train_streaming
from store_bridge.events.files import write_dataset
from store_bridge.events.schema import EVENT_TIMESTAMP, time_windows
from store_bridge.events.synthetic import SyntheticConfig, generate
from store_bridge.feast_objects import ITEM_VIEW, USER_HISTORY_VIEW
from store_bridge.logging_tier import LogReport
from store_bridge.repo import FeatureRepo, FMVersion, feast_apply
from store_bridge.versions import publish

HISTORY_SNAPSHOT_LEN = 32


@dataclass
class DemoSize:
    synthetic: SyntheticConfig
    fm_max_history: int = 64
    fm_max_steps: int | None = None
    expert_epochs: int = 3

    @classmethod
    def default(cls) -> DemoSize:
        return cls(SyntheticConfig())

    @classmethod
    def tiny(cls) -> DemoSize:
        return cls(
            SyntheticConfig(n_users=60, n_items=80, n_categories=6, days=8),
            fm_max_history=16,
            expert_epochs=1,
        )


@dataclass
class DemoReport:
    windows: dict[str, tuple[str, str]]
    fm_ne: dict[str, dict[str, float]] = field(default_factory=dict)  # version -> task -> NE
    expert_ne: dict[str, dict[str, float]] = field(default_factory=dict)  # expert -> task -> NE
    experts: dict[str, str | None] = field(default_factory=dict)  # expert -> fm_version
    logging: list[LogReport] = field(default_factory=list)
    unseen_tasks: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    live: LiveReport | None = None  # the last stage's figures


@dataclass
class LiveReport:
    """What the live stage measured: events replayed, seconds to ingest them, seconds from the
    start of ingestion until the histories and offline consumers had acknowledged them all,
    and the event-to-TAE visibility probes (ms)."""

    events: int
    ingest_s: float
    caught_up_s: float
    fm_version: str
    user_offset: int  # replayed users' ids: the log's ids + this
    visibility_ms: list[float] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.ingest_s, 1e-9)

    def visibility(self, q: float) -> float:
        """The q-quantile (0..1) of the visibility latencies, ms."""
        return float(np.quantile(self.visibility_ms, q)) if self.visibility_ms else float("nan")


def reset_state(repo: FeatureRepo, redis_url: str) -> None:
    """Forget earlier demo state: `feast apply` on an empty manifest drops the old views'
    online rows (Feast deletes a removed view's rows itself), then the files go."""
    if repo.manifest_path.exists() or repo.experts_dir.exists():
        repo.manifest_path.unlink(missing_ok=True)
        shutil.rmtree(repo.experts_dir, ignore_errors=True)
        feast_apply(repo, redis_url)
    for path in [repo.checkpoints_dir, repo.models_dir, repo.events_dir]:
        shutil.rmtree(path, ignore_errors=True)
    for tae in repo.data.glob("tae_v*"):
        shutil.rmtree(tae, ignore_errors=True)


def write_user_history(repo: FeatureRepo, events: pd.DataFrame, as_of: pd.Timestamp) -> Path:
    """Each user's most recent events as of `as_of`: the expert's short-term input at serving."""
    users = np.sort(events["user_id"].unique())
    ts = np.full(len(users), as_of.value // 1000, dtype=np.int64)
    items, actions = recent_history(events, users, ts, HISTORY_SNAPSHOT_LEN)
    frame = pd.DataFrame(
        {
            "user_id": users,
            "recent_items": list(items),
            "recent_actions": list(actions),
            EVENT_TIMESTAMP: pd.Series([as_of] * len(users)).astype("datetime64[us, UTC]"),
        }
    )
    path = repo.data / "user_history.parquet"
    frame.to_parquet(path, index=False)
    return path


def is_terminal(stream: object) -> bool:
    """Whether `stream` is a terminal: progress bars are drawn only there (a log file or a CI
    log gets plain lines instead of carriage returns and colour codes)."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextlib.contextmanager
def _quiet(stdout: bool, stderr: bool) -> Iterator[None]:
    """Swallow a library's own console chatter (Feast's colour codes, its tqdm bar) on the
    streams named; its exceptions still propagate."""
    with contextlib.ExitStack() as stack:
        if stdout:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


# The stages as README's "What `foundex demo` does" numbers them.
STAGES = (
    "synthetic events, feast apply",
    "two FMs (small v1, large v2), one streaming pass each, published as versions",
    "logging both versions' TAEs for the impressions after the FM window (parquet + Redis)",
    "item features and user histories online (feast materialize)",
    "expert configs pinned to each version and a no-FM baseline, applied (feast apply)",
    "point-in-time training sets, expert training, NE per task beside the FMs' own",
    "the live path: the log's last 5% replayed as new users' events through ingestion, online "
    "histories and the offline log; event-to-TAE visibility",
)
LIVE_SHARE = 0.05  # the log's last share (by event time) the live stage replays
LIVE_PROBES = 20  # event-to-TAE visibility probes of the live stage


def run_demo(
    repo: FeatureRepo,
    redis_url: str,
    size: DemoSize,
    *,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> DemoReport:
    """Run the demo's seven STAGES into `repo`; returns what they measured.

    `say` gets one heading line per stage and one `done in N.Ns` line when it ends. Progress
    bars (ours and Feast's) are drawn only when `progress` is set and stderr is a terminal;
    otherwise nothing with carriage returns or ANSI codes is printed, so logs stay plain.
    """
    # One context for the run: the logging stage's store (a long timeout: bulk writes) and
    # Feast's store for materialisation, given the Redis address without exporting it.
    ctx = ServiceContext(Settings(repo=repo.path, redis_url=redis_url), redis_url,
                         redis_timeout_s=30)
    bars = progress and is_terminal(sys.stderr)
    clock: dict[str, float] = {}
    t = time.perf_counter()
    stage_start = t

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        clock[name] = round(now - t, 2)
        t = now

    def stage(n: int) -> None:
        nonlocal stage_start
        stage_start = time.perf_counter()
        say(f"{n}/{len(STAGES)} {STAGES[n - 1]}")

    def done() -> None:
        say(f"    done in {time.perf_counter() - stage_start:.1f}s")

    stage(1)
    earlier = repo.load_manifest().versions if repo.manifest_path.exists() else {}
    if earlier:  # the demo starts afresh; say so rather than wipe published versions silently
        say(f"    starting afresh: removing FM versions {', '.join(earlier)}, their experts "
            f"and data from {repo.path}")
    reset_state(repo, redis_url)
    events, items, spec = generate(size.synthetic)
    write_dataset(repo.events_dir, events, items, spec)
    shutil.copyfile(repo.events_dir / "items.parquet", repo.data / "items.parquet")
    windows = time_windows(events)
    report = DemoReport(
        windows={k: (a.isoformat(), b.isoformat()) for k, (a, b) in windows.items()},
        unseen_tasks=list(spec.unseen_tasks),
    )
    say(f"    {len(events):,} impressions, {spec.n_users} users, {spec.n_items} items")
    # Read-through reads users' histories from Redis: seed them from the log just written.
    seeded = backfill_histories(ctx)
    say(f"    {seeded:,} events into the online histories (newest "
        f"{ctx.settings.history_cap} per user)")
    feast_apply(repo, redis_url)
    lap("data")
    done()

    stage(2)
    fm_start, fm_end = windows["fm"]
    fm_kw = dict(
        **spec.fm_fields(),
        max_history=size.fm_max_history,
    )
    versions = {}
    for label, config in [("small", FMConfig.small(**fm_kw)), ("large", FMConfig.large(**fm_kw))]:
        result = train_streaming(
            events, config, end=fm_end, max_steps=size.fm_max_steps, progress=bars
        )
        ckpt = repo.data / "training" / f"fm_{label}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(result.model, ckpt, {"steps": result.steps, "label": label})
        entry = publish(
            repo,
            ckpt,
            redis_url,
            training_window=(fm_start.isoformat(), fm_end.isoformat()),
            description=f"{label} FM, {result.steps} steps",
        )
        versions[entry.version] = entry
        say(f"    published {entry.version} ({label}, dim {entry.dim}, {result.seconds:.1f}s)")
    lap("fm_train")
    done()

    stage(3)
    histories = UserHistories.from_events(events, spec.surfaces)
    logged = events[events[EVENT_TIMESTAMP] >= fm_end]

    def logged_one(rep: LogReport) -> None:
        report.logging.append(rep)
        say(f"    {rep.version}: {rep.rows:,} rows, {rep.rows_per_s:,.0f} rows/s")

    log_impressions(ctx, logged, versions=versions.values(), histories=histories,
                    progress=bars, on_report=logged_one)
    lap("logging")
    done()

    stage(4)
    end = windows["eval"][1]
    write_user_history(repo, events, end)
    fs = ctx.feature_store
    # Feast prints colour codes to stdout and draws a tqdm bar on stderr: kept only where
    # they land on a terminal and bars are wanted.
    with warnings.catch_warnings(), _quiet(not (bars and is_terminal(sys.stdout)), not bars):
        warnings.simplefilter("ignore", DeprecationWarning)  # ibis's use of a deprecated DuckDB call
        fs.materialize(
            start_date=(events[EVENT_TIMESTAMP].min() - pd.Timedelta(days=1)).to_pydatetime(),
            end_date=(end + pd.Timedelta(seconds=1)).to_pydatetime(),
            feature_views=[ITEM_VIEW, USER_HISTORY_VIEW],
        )
    # Feast's DuckDB store reads through ibis's default backend; dropping it lets its DuckDB
    # connection close now rather than at interpreter exit (where nanobind reports leaks).
    import ibis

    ibis.options.default_backend = None
    lap("materialize")
    done()

    stage(5)
    surface = spec.surfaces[0]
    tasks = list(spec.surface_tasks[surface])
    configs = [
        ExpertConfig(
            name=f"{surface}_{v}", surface=surface, tasks=tasks, fm_version=v,
            epochs=size.expert_epochs, description=f"{surface} expert on FM {v}",
        )
        for v in versions
    ] + [
        ExpertConfig(
            name=f"{surface}_nofm", surface=surface, tasks=tasks, fm_version=None,
            epochs=size.expert_epochs, description="baseline without FM embeddings",
        )
    ]
    manifest = repo.load_manifest()
    for cfg in configs:
        check_against_manifest(cfg, manifest)
        save_expert_config(cfg, repo.experts_dir)
    feast_apply(repo, redis_url)
    lap("expert_configs")
    done()

    stage(6)
    from api.services.expert_training import train_on_windows

    repo.models_dir.mkdir(parents=True, exist_ok=True)
    for cfg in configs:  # the training of `foundex expert train` (api/services/expert_training)
        entry = versions.get(cfg.fm_version) if cfg.fm_version else None
        trained = train_on_windows(repo, cfg, entry, events, spec, progress=bars)
        save_expert(trained.model, cfg, repo.models_dir / f"{cfg.name}.pt")
        report.expert_ne[cfg.name] = trained.ne
        report.experts[cfg.name] = cfg.fm_version
    lap("experts")
    for v, entry in versions.items():  # the FMs' own NE on the same evaluation window
        from fm import load_checkpoint

        model, _ = load_checkpoint(repo.data / entry.checkpoint)
        report.fm_ne[v] = evaluate_fm(model, events, model.config, *windows["eval"])
    lap("fm_eval")
    done()

    stage(7)
    report.live = replay_live(ctx, events, next(iter(versions.values())))
    live = report.live
    say(f"    replayed {live.events:,} events (the log's last {LIVE_SHARE:.0%}, re-timed to now, "
        f"as new users: id + {live.user_offset}): ingested in {live.ingest_s:.2f}s "
        f"({live.events_per_s:,.0f} events/s)")
    say(f"    histories and offline log caught up {live.caught_up_s:.2f}s after ingestion began")
    say(f"    event-to-TAE visibility (FM {live.fm_version}, {len(live.visibility_ms)} probes): "
        f"p50 {live.visibility(0.5):.1f} ms, p99 {live.visibility(0.99):.1f} ms")
    lap("live")
    done()
    ctx.close()
    report.seconds = clock
    return report


def replay_live(
    ctx: ServiceContext, events: pd.DataFrame, version: FMVersion, *,
    share: float = LIVE_SHARE, probes: int = LIVE_PROBES, timeout_s: float = 120.0,
) -> LiveReport:  # fmt: skip
    """The live path on the demo's repo: the log's last `share` of events (by event time),
    shifted so that the last one is a second old (gaps kept) and given to new users (id +
    `live_user_offset(events)`), ingested through the ingest use-case while the `histories`
    and `offline` consumers run in threads; then `probes` event-to-TAE visibility probes of
    `version` (store_bridge/streams/visibility.py) for those users.

    New users, so that the live events change no history the earlier stages logged TAEs for
    (a stored TAE older than its user's newest event is computed again by lookups): the
    replayed users exist only through the stream. Their events stay: online histories and the
    offline log (data/events/live) hold them. Raises TimeoutError when the consumers have not
    caught up within `timeout_s`."""
    import threading

    from api.services.consumers import build_consumer
    from api.services.events import dataset_spec, ingest
    from fm.timefeatures import timestamps_us, to_us
    from store_bridge.streams.histories import HistoriesConsumer
    from store_bridge.streams.visibility import measure_visibility

    spec = dataset_spec(ctx)
    tail = events.sort_values(EVENT_TIMESTAMP, kind="stable").tail(max(1, int(len(events) * share)))
    ts = timestamps_us(tail[EVENT_TIMESTAMP])
    now = to_us(pd.Timestamp.now(tz="UTC").to_pydatetime())
    frame = tail.assign(**{
        EVENT_TIMESTAMP: pd.to_datetime(ts - ts.max() + now - 1_000_000, unit="us", utc=True),
        "user_id": tail["user_id"] + live_user_offset(events),
    })  # fmt: skip
    histories, offline = (build_consumer(ctx, role) for role in ("histories", "offline"))
    stops = {w.group: threading.Event() for w in (histories, offline)}
    threads = {w.group: threading.Thread(target=w.run, args=(stops[w.group],),
                                         name=f"demo-{w.group}") for w in (histories, offline)}
    users = [int(u) for u in pd.unique(frame["user_id"])[:5]]
    items = np.unique(events["item_id"].to_numpy(np.int64))[:8]
    try:
        for thread in threads.values():
            thread.start()
        t0 = time.perf_counter()
        appended = ingest(ctx, frame).new
        ingest_s = time.perf_counter() - t0
        caught_up_s = _wait_caught_up(ctx, ["histories", "offline"], t0, timeout_s)
        stops["histories"].set()  # the probes run a histories consumer of their own
        threads["histories"].join()
        seen = measure_visibility(
            ctx.events_stream, HistoriesConsumer(ctx.events_stream, ctx.histories), ctx.fm_tier,
            version, spec, users, items, spec.surfaces[0], samples=probes,
        )  # fmt: skip
        _wait_caught_up(ctx, ["offline"], t0, timeout_s)  # the probes are events too
    finally:
        for group, thread in threads.items():
            stops[group].set()
            if thread.ident is not None:  # started
                thread.join()
        offline.close()  # the offline log's folder lock
    return LiveReport(appended, ingest_s, caught_up_s, version.version, live_user_offset(events),
                      [x * 1000 for x in seen.latencies_s])  # fmt: skip


def live_user_offset(events: pd.DataFrame) -> int:
    """What the live stage adds to a user id: the next power of ten above every id of the log
    (so that 17 stays readable as 1017 in a log of users below 1000)."""
    return 10 ** len(str(max(int(events["user_id"].max()), 0)))


def _wait_caught_up(ctx: ServiceContext, groups: list[str], t0: float, timeout_s: float) -> float:
    """Seconds from `t0` (perf_counter) until every group of the events stream has
    acknowledged every event."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = {g.group: g.events for g in ctx.events_stream.lag()}
        if all(lag.get(g) == 0 for g in groups):
            return time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo's consumers are still behind after {timeout_s:.0f}s: {lag}")
        time.sleep(0.01)


TR_NOTE = (
    "TR = (NE(expert on FM1) - NE(expert on FM2)) / (NE(FM1) - NE(FM2)): the share of the FM's\n"
    "gain that reaches the expert (the paper reports 0.64-1.0); n/a where the second FM is not\n"
    "better than the first, '-' where the FM has no head for the task."
)


def ne_table(report: DemoReport) -> str:
    """Markdown table: NE per task for every expert and FM version (lower is better; 1.0 = the
    base rate), and the Transfer Ratio from the first FM version to the second."""
    names = list(report.expert_ne)
    versions = list(report.fm_ne)
    tasks: list[str] = []
    for ne in report.expert_ne.values():
        tasks.extend(t for t in ne if t not in tasks)
    pinned = {v: next((n for n in names if report.experts[n] == v), None) for v in versions}
    tr_cols = len(versions) == 2 and all(pinned.values())
    head = ["task", *(f"{n} ({report.experts[n] or 'no FM'})" for n in names)]
    head += [f"FM {v}" for v in versions]
    if tr_cols:
        head.append(f"TR {versions[0]}->{versions[1]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x: float) -> str:
        return "-" if x != x else f"{x:.4f}"  # NaN: the FM has no head for this task

    for task in tasks:
        mark = " (unseen by FM)" if task in report.unseen_tasks else ""
        cells = [fmt(report.expert_ne[n].get(task, float("nan"))) for n in names]
        cells += [fmt(report.fm_ne[v].get(task, float("nan"))) for v in versions]
        if tr_cols:
            v1, v2 = versions
            fm1 = report.fm_ne[v1].get(task, float("nan"))
            fm2 = report.fm_ne[v2].get(task, float("nan"))
            if fm2 < fm1:
                tr = transfer_ratio(
                    report.expert_ne[pinned[v1]][task], report.expert_ne[pinned[v2]][task],
                    fm1, fm2,
                )
                cells.append(fmt(tr))
            else:  # the second FM is not better: a ratio of two regressions says nothing
                cells.append("-" if fm1 != fm1 or fm2 != fm2 else "n/a")
        lines.append(f"| {task}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
