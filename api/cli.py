"""The `foundex` command line."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from api.settings import Settings

if TYPE_CHECKING:
    import pandas as pd

    from api.services.context import ServiceContext
    from store_bridge.redis_server import EmbeddedRedis

app = typer.Typer(
    help="foundex: a Feast-centred embedding service for the Foundation-Expert paradigm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
fm_app = typer.Typer(
    help="FM versions: publish, list, retire, gc; export a serving artifact.", no_args_is_help=True
)
app.add_typer(fm_app, name="fm")
bench_app = typer.Typer(
    help="Benchmarks: peers side by side in one run, a table, then one JSON object as the last line.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

RepoOpt = Annotated[
    Path | None, typer.Option("--repo", help="Feast repo (default: $FOUNDEX_REPO or feature_repo)")
]

expert_app = typer.Typer(help="Experts: train one on the repo's event log.", no_args_is_help=True)
app.add_typer(expert_app, name="expert")


@expert_app.command("train")
def expert_train(
    name: Annotated[str, typer.Argument(help="expert name (its config under data/experts/)")],
    fm_checkpoint: Annotated[
        Path | None,
        typer.Option("--fm-checkpoint",
                     help="an unpublished FM checkpoint of the pinned version's width: TAEs "
                          "computed with it on the fly (nothing written); NE shown beside "
                          "the published version's"),
    ] = None,
    repo: RepoOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bars")] = False,
) -> None:
    """Train an expert on the expert window of the repo's event log and print NE per task on
    the evaluation window, as the demo does. Without --fm-checkpoint: TAEs from the pinned
    version's logged offline store; the model is saved to data/models/NAME.pt. With it: the
    expert is trained twice (same seed and data), on the pinned version's TAEs and on the
    checkpoint's (history strictly before each row), and nothing is saved."""
    settings = _settings(repo)
    if fm_checkpoint is not None and not fm_checkpoint.is_file():
        _fail(f"FM checkpoint not found: {fm_checkpoint}" if not fm_checkpoint.exists()
              else f"--fm-checkpoint {fm_checkpoint} is not a file")
    from api.services.errors import ServiceError
    from api.services.expert_training import ne_report_table, train_expert_use_case

    try:
        rep = train_expert_use_case(
            _context(settings), name, fm_checkpoint=fm_checkpoint,
            progress=not no_progress and sys.stderr.isatty(),
            say=lambda s: typer.echo(s, err=True),
        )
    except ServiceError as e:
        _service_error(e)
    (a, b), (_, c) = rep.windows["expert_train"], rep.windows["eval"]
    typer.echo(f"expert {rep.expert} ({rep.fm_version or 'no FM'}): trained on "
               f"{rep.published.train_rows:,} rows [{a} .. {b}), NE on {rep.published.eval_rows:,} "
               f"rows [{b} .. {c})")
    typer.echo(ne_report_table(rep))
    missing = f"rows without a TAE: {rep.fm_version} {rep.published.without_embedding:,}"
    if rep.candidate is not None:
        typer.echo(f"{missing}, checkpoint {rep.candidate.without_embedding:,}")
        typer.echo("nothing written: TAEs computed on the fly, no model saved")
    elif rep.fm_version is not None:
        typer.echo(missing)
    if rep.saved is not None:
        typer.echo(f"saved {rep.saved}")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@app.callback()
def _main() -> None:
    # SIGTERM and SIGHUP end Python without running atexit hooks, so an embedded
    # redis-server that a command started would outlive it, orphaned. Turned into an exit,
    # they run them. (uvicorn restores this handler after its own graceful shutdown and then
    # re-raises the signal it caught.) A signal set to be ignored (nohup) stays ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)


def _settings(repo: Path | None) -> Settings:
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as e:  # a FOUNDEX_* variable the settings cannot take
        err = e.errors()[0]
        name = "FOUNDEX_" + str(err["loc"][0]).upper() if err["loc"] else "a FOUNDEX_ variable"
        _fail(f"{name}={err.get('input')!r}: {err['msg'].lower()}")
    if repo is not None:
        settings.repo = repo
    if not (settings.repo / "feature_store.yaml").exists():
        raise typer.BadParameter(f"no feature_store.yaml in {settings.repo}", param_hint="--repo")
    return settings


def _redis(settings: Settings) -> str:
    """REDIS_URL, or the repo's embedded server (see `_resolve_redis`)."""
    return _resolve_redis(settings)[0]


def _resolve_redis(settings: Settings, *, detach: bool = False) -> tuple[str, EmbeddedRedis | None]:
    """REDIS_URL, or the repo's embedded server: reused if one runs, else started here and
    stopped when this process exits (`detach`: left running). Exit 2 with one line for a
    REDIS_URL that foundex or Feast cannot use, or a server that does not start."""
    from store_bridge.redis_server import RedisUnavailable, resolve_redis_url

    try:
        url, server = resolve_redis_url(settings.redis_url, settings.repo / "data", detach=detach)
    except (ValueError, RedisUnavailable) as e:
        _fail(str(e))
    if server is not None:
        how = "started" if server.started else "using"
        typer.echo(f"{how} embedded redis at {url} (data in {server.data_dir})", err=True)
        if server.orphaned_by is not None:
            typer.echo(f"note: foundex process {server.orphaned_by} started it and exited without "
                       "stopping it; `foundex redis --stop` stops it", err=True)
    return url, server


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _context(settings: Settings, *, bulk: bool = False) -> ServiceContext:
    """The use-cases' context for one command. Redis is resolved (the embedded server
    started) only when a use-case first needs it, after its cheap checks. `bulk`: a long
    timeout, for commands that write many rows."""
    from api.services.context import ServiceContext

    return ServiceContext(settings, lambda: _redis(settings), redis_timeout_s=30 if bulk else None)


def _service_error(e: Exception) -> NoReturn:
    """A domain error as one `error:` line (a failed tool's full output follows it)."""
    from api.services.errors import Unavailable

    _fail(e.details if isinstance(e, Unavailable) and e.details != str(e) else str(e))


@app.command()
def demo(
    repo: RepoOpt = None,
    tiny: Annotated[
        bool,
        typer.Option(help="a very small run, as the tests use: about 40 s on 2 CPU cores "
                          "(the default size takes about 1.5-2 minutes)"),
    ] = False,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="no progress bars (for logs and CI)")
    ] = False,
) -> None:
    """The main job, end to end on synthetic data: make data, feast apply, train two FM
    versions (small v1, large v2), log both versions' TAEs, train experts pinned to each and a
    no-FM baseline, evaluate NE on a later window, print a summary table. About 1.5-2 minutes
    on 2 CPU cores; --tiny about 40 s."""
    from api.pipeline import TR_NOTE, DemoSize, ne_table, run_demo
    from store_bridge.repo import FeatureRepo

    settings = _settings(repo)
    url = _redis(settings)
    t0 = time.perf_counter()
    report = run_demo(
        FeatureRepo(settings.repo),
        url,
        DemoSize.tiny() if tiny else DemoSize.default(),
        progress=not no_progress,
        say=typer.echo,
    )
    typer.echo("\nNE per task on the evaluation window " f"{report.windows['eval'][0]} .. {report.windows['eval'][1]}")
    typer.echo(ne_table(report))
    typer.echo(TR_NOTE)
    typer.echo(f"stage seconds: {json.dumps(report.seconds)}")
    typer.echo(f"demo wall time: {time.perf_counter() - t0:.1f}s")
    typer.echo(f"serve it with: foundex serve --repo {settings.repo}")


@app.command()
def serve(
    repo: RepoOpt = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Run the REST service (FastAPI under uvicorn) over the repo's stores. Ctrl-C or SIGTERM
    shut it down gracefully, and stop the embedded Redis if this command started it."""
    settings = _settings(repo)
    url = _redis(settings)
    import uvicorn

    from api.app import create_app

    # No access log: the app logs every request once itself, as a JSON line.
    uvicorn.run(
        create_app(settings, url), host=host, port=port, log_level="info", access_log=False
    )


@app.command()
def apply(repo: RepoOpt = None) -> None:
    """`feast apply` on the repo, with the Redis address exported for Feast."""
    from store_bridge.repo import FeastApplyError, FeatureRepo, feast_apply

    settings = _settings(repo)
    try:
        typer.echo(feast_apply(FeatureRepo(settings.repo), _redis(settings)))
    except FeastApplyError as e:
        _fail(str(e))


@app.command()
def redis(
    repo: RepoOpt = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="start the embedded server in the background unless it "
                                      "runs, print the exports and return"),
    ] = False,
    stop: Annotated[
        bool,
        typer.Option("--stop", help="stop the embedded server that --detach started (its "
                                    "data stays under <repo>/data/redis)"),
    ] = False,
) -> None:
    """Print `export REDIS_URL=...` and `export FOUNDEX_FEAST_REDIS=...` for running `feast`
    by hand. Plain: starts the embedded Redis and keeps it running until Ctrl-C (or SIGTERM).
    `eval "$(foundex redis --detach)"` starts it in the background and returns;
    `foundex redis --stop` stops it. With REDIS_URL set, prints the exports for that server."""
    from store_bridge.redis_server import (
        FEAST_ENV,
        EmbeddedRedisBusy,
        RedisUnavailable,
        feast_connection_string,
        stop_embedded,
    )

    if detach and stop:
        raise typer.BadParameter("--detach and --stop exclude each other", param_hint="--stop")
    settings = _settings(repo)
    if stop:
        try:
            stopped = stop_embedded(settings.repo / "data" / "redis")
        except (EmbeddedRedisBusy, RedisUnavailable) as e:
            _fail(str(e))
        typer.echo(f"stopped embedded redis at {stopped}" if stopped
                   else f"no embedded redis running for {settings.repo}", err=True)
        return
    url, server = _resolve_redis(settings, detach=detach)
    feast = feast_connection_string(url)
    typer.echo(f"export REDIS_URL={shlex.quote(url)}\nexport {FEAST_ENV}={shlex.quote(feast)}")
    if detach:
        if not settings.redis_url:
            typer.echo(f"`foundex redis --stop --repo {settings.repo}` stops it.", err=True)
        return
    if server is None or not server.started:
        return  # REDIS_URL, or a server another process runs: nothing of ours to keep
    typer.echo("Ctrl-C stops it.", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@fm_app.command("publish")
def fm_publish(
    checkpoint: Annotated[Path, typer.Argument(help="FM checkpoint (.pt) written by training")],
    train_start: Annotated[
        str,
        typer.Option(help="start of the events the FM trained on: ISO 8601, e.g. 2026-01-05 or "
                          "2026-01-05T00:00:00Z; without an offset it is UTC"),
    ],
    train_end: Annotated[
        str,
        typer.Option(help="end (exclusive) of those events, ISO 8601 as --train-start; after "
                          "--train-start, not in the future"),
    ],
    repo: RepoOpt = None,
    ttl_days: Annotated[
        int,
        typer.Option(min=1, max=36500,
                     help="days a logged embedding stays valid: the TTL of the version's Feast "
                          "view; a training-set row takes no embedding older than this"),
    ] = 7,
    description: Annotated[
        str,
        typer.Option(help="free text kept with the version in data/fm_versions.yaml and shown "
                          "by `foundex fm list`"),
    ] = "",
    allow_duplicate: Annotated[
        bool,
        typer.Option("--allow-duplicate",
                     help="publish even if a version already holds this very checkpoint"),
    ] = False,
) -> None:
    """Publish an FM checkpoint as the next version (its own fm_tae_<v> view) and apply.
    Version names are never reused, not even after gc. Refused: a file that is not a foundex
    checkpoint, a serving artifact (`fm export` output), a bad or reversed window, a
    checkpoint that is already a version."""
    from api.services import lifecycle
    from api.services.errors import ServiceError

    try:
        entry = lifecycle.publish(
            _context(_settings(repo)), checkpoint, training_window=(train_start, train_end),
            ttl_seconds=ttl_days * 86400, description=description,
            allow_duplicate=allow_duplicate,
        )
    except ServiceError as e:
        _service_error(e)
    typer.echo(f"published {entry.version} (dim {entry.dim}, digest {entry.digest[:12]})")


@fm_app.command("list")
def fm_list(repo: RepoOpt = None) -> None:
    """List FM versions and the experts pinned to each; versions deleted by gc last (their
    names are never reused)."""
    from api.services import lifecycle
    from store_bridge.versions import VersionError

    try:
        listing = lifecycle.list_versions(_context(_settings(repo)))
    except VersionError as e:
        _fail(str(e))
    if not listing.versions and not listing.deleted:
        typer.echo("no FM versions published")
    for item in listing.versions:
        v, pins = item.entry, ", ".join(item.pinned_by) or "-"
        about = f"\t{v.description}" if v.description else ""
        sync = f"seq {item.sync.seq} at {item.sync.time}" if item.sync else "none"
        typer.echo(
            f"{v.version}\t{v.status}\tdim={v.dim}\tdigest={v.digest[:12]}\tsync: {sync}"
            f"\tpinned by: {pins}{about}"
        )
    for d in listing.deleted:
        typer.echo(f"{d.version}\tdeleted\tdim={d.dim}\tdigest={d.digest[:12]}\tgc at {d.deleted_at}")


@fm_app.command("retire")
def fm_retire(
    version: str,
    repo: RepoOpt = None,
    force: Annotated[bool, typer.Option(help="Retire even if experts pin it")] = False,
) -> None:
    """Mark a version retired (refused while an expert pins it, unless --force)."""
    from api.services import lifecycle
    from api.services.errors import ServiceError

    try:
        lifecycle.retire(_context(_settings(repo)), version, force=force)
    except ServiceError as e:
        _service_error(e)
    typer.echo(f"retired {version}")


@fm_app.command("train")
def fm_train(
    follow: Annotated[
        str,
        typer.Option("--follow", metavar="VERSION",
                     help="an active published FM version: keep training it on the live event "
                          "stream (its own consumer group trainer:VERSION)"),
    ],
    repo: RepoOpt = None,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="steps between checkpoints (stream entries are "
                                      "acknowledged only once a checkpoint covers them)")
    ] = 100,
    sync_every: Annotated[
        int, typer.Option(min=0, help="steps between weight-sync updates (0: no sync)")
    ] = 50,
    snapshot_every: Annotated[
        int, typer.Option(min=1, help="every F-th sync update is a full snapshot")
    ] = 10,
    sync_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="share of the weights' bytes a delta ships "
                                                   "(the most-updated components), in (0, 1]")
    ] = 0.3,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="stop at this step count (resumed steps included)")
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="train what the stream holds now, then exit")
    ] = False,
) -> None:
    """Continuous training of a published FM version on the live event stream: request-shaped
    batches with progressive validation, a checkpoint every K steps with the stream position
    (data/fm_follow/VERSION/), weight-sync updates every S steps. After a crash it resumes from
    the last checkpoint: no event is trained twice, none is skipped. Progress (steps, events/s,
    progressive NE, sync seq) on stderr. Ctrl-C or SIGTERM: the current batch is finished,
    a checkpoint written, exit 0."""
    import threading

    from api.services.errors import ServiceError
    from api.services.freshness import FollowOptions
    from api.services.freshness import follow as follow_version

    options = FollowOptions(checkpoint_every=checkpoint_every, sync_every=sync_every,
                            snapshot_every=snapshot_every, sync_fraction=sync_fraction,
                            max_steps=max_steps, once=once)  # fmt: skip
    try:
        options.check()
    except ServiceError as e:
        _service_error(e)
    settings = _settings(repo)
    _stream_log_to_stderr()
    ctx = _context(settings, bulk=True)
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        if stop.is_set():  # a second signal: leave now (the last checkpoint stands)
            raise SystemExit(128 + signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    t0, seen = time.perf_counter(), [0]

    def _progress(s) -> None:
        seen[0] += s.metrics.events
        if s.checkpoint is None and s.metrics.step % 10:
            return
        rate = seen[0] / max(time.perf_counter() - t0, 1e-9)
        ne = " ".join(f"ne_{t}={v:.4f}" for t, v in list(s.metrics.ne.items())[:3])
        sync = "off" if s.sync_seq is None else s.sync_seq
        saved = f" checkpoint {s.checkpoint.name}" if s.checkpoint is not None else ""
        typer.echo(f"fm train {follow}: step {s.metrics.step} ({rate:,.0f} events/s) {ne} "
                   f"sync seq {sync} at {s.position}{saved}", err=True)  # fmt: skip

    import redis as redis_lib

    try:
        rep = follow_version(ctx, follow, options, stop=stop, on_step=_progress)
    except ServiceError as e:
        _service_error(e)
    except redis_lib.RedisError as e:
        _fail(f"redis at {_shown_url(ctx.redis_url)}: {e}")
    finally:
        ctx.close()
    ne = " ".join(f"ne_{t}={v:.4f}" for t, v in rep.ne.items())
    typer.echo(f"fm train {follow}: {rep.steps} steps; this run {rep.events:,} events in "
               f"{rep.entries:,} entries, {time.perf_counter() - t0:.1f}s; position "
               f"{rep.position or '-'}; sync seq {rep.sync_seq}; {ne}; checkpoint {rep.checkpoint}")


@app.command("log")
def log_cmd(
    impressions: Annotated[
        Path,
        typer.Option(help="parquet of impressions: user_id, item_id (integers), event_timestamp "
                          "(a timestamp; without a time zone it is UTC; ISO 8601 text works, "
                          "epoch numbers do not), surface (one the FM versions know); an hour "
                          "column, if present, is ignored (the FM derives it from the time)"),
    ],
    repo: RepoOpt = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="no progress bars (drawn only on a terminal)")
    ] = False,
    chunk_rows: Annotated[int, typer.Option(min=1, help="rows per chunk (one file per day)")] = 20000,
) -> None:
    """Compute the TAEs of every active FM version for logged impressions; write them offline
    (partitioned parquet) and online (Redis, Feast's layout). Safe to rerun: a run stopped
    part-way (killed, Redis gone) resumes where it stopped.

    The rows are checked before anything heavy starts; times are UTC (a timestamp without a
    time zone is taken as UTC), 1970-01-01 to 2262-04-10; epoch numbers are refused (their
    unit is ambiguous)."""
    settings = _settings(repo)
    if not impressions.is_file():
        _fail(f"impressions file not found: {impressions}" if not impressions.exists()
              else f"--impressions {impressions} is not a file")

    import pandas as pd
    import pyarrow as pa

    from api.services.errors import Invalid, ServiceError

    try:
        frame = pd.read_parquet(impressions)
    except (OSError, ValueError, pa.ArrowException) as e:
        _fail(f"{impressions}: not a readable parquet file ({type(e).__name__})")
    from api.services import offline

    ctx = _context(settings, bulk=True)
    try:  # the rows, before torch, Feast or Redis
        frame = offline.check_impressions(ctx, frame, on_note=lambda note: typer.echo(
            f"note: {note}", err=True))
    except Invalid as e:
        _fail(f"{impressions}: {e}")
    except ServiceError as e:
        _service_error(e)
    _ping_redis(ctx)

    from api.pipeline import is_terminal
    from api.services.errors import StoreUnavailable

    def show(rep) -> None:
        typer.echo(f"{rep.version}: {rep.rows:,} rows in {rep.seconds:.1f}s "
                   f"({rep.rows_per_s:,.0f} rows/s), {rep.files} files, {rep.online_written:,} online, "
                   f"{rep.skipped_chunks} chunks done by an earlier run")

    try:
        offline.log_impressions(ctx, frame, progress=not no_progress and is_terminal(sys.stderr),
                                chunk_rows=chunk_rows, on_report=show, checked=True)
    except Invalid as e:  # the file's rows
        _fail(f"{impressions}: {e}")
    except StoreUnavailable as e:  # finished chunks are kept; a rerun skips them
        _fail(f"redis at {_shown_url(ctx.redis_url)} stopped answering ({e}); nothing "
              "written is lost: run the same command again to resume")
    except ServiceError as e:
        _service_error(e)


def _shown_url(url: str) -> str:
    """A Redis URL without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _ping_redis(ctx: ServiceContext) -> None:
    """Exit 2 with one line unless the context's Redis answers a PING (resolving it starts
    the embedded server when REDIS_URL is unset)."""
    import redis

    url = ctx.redis_url
    try:
        ctx.client.ping()
    except (redis.RedisError, OSError) as e:
        _fail(f"redis at {_shown_url(url)} does not answer: {e}")


@app.command("ingest")
def ingest_cmd(
    file: Annotated[
        Path,
        typer.Argument(help="event log in the canonical schema, parquet (.parquet) or CSV (.csv): "
                            "user_id, item_id, event_timestamp (with a time zone), surface, "
                            "action; optional request_id, event_id, one column per task label"),
    ],
    repo: RepoOpt = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="events per second to replay at (default: as fast as "
                                     "possible)"),
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="no progress bar (drawn only on a terminal)")
    ] = False,
) -> None:
    """Replay an event log into the events stream, in event-time order, through the same
    checks as POST /v1/events. Bad rows are reported (the first few) and the rest ingested;
    exit code 1 if any row was rejected. A full stream is waited on (with backoff) until its
    consumers (`foundex consume histories|offline`) catch up: nothing is dropped. Safe to rerun:
    event ids deduplicate within FOUNDEX_EVENT_DEDUP_S seconds."""
    settings = _settings(repo)
    frame = _read_event_log(file)
    from api.services.errors import Invalid, ServiceError
    from api.services.events import dataset_spec

    ctx = _context(settings, bulk=True)
    try:
        dataset_spec(ctx)  # before Redis starts
    except ServiceError as e:
        _service_error(e)
    order = _event_time_order(frame)
    frame = frame.iloc[order].reset_index(drop=True)
    size = settings.stream_batch_events
    if rate is not None:  # small chunks at low rates, so the pace is smooth (~20 appends/s)
        size = max(1, min(size, int(rate / 20)))
    from tqdm import tqdm

    bar = tqdm(total=len(frame), desc="ingest", unit="ev",
               disable=no_progress or not sys.stderr.isatty())  # fmt: skip
    totals = {"accepted": 0, "duplicates": 0}
    rejected: list[tuple[int, str, str]] = []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(frame), size):
            chunk = frame.iloc[start : start + size]
            if rate is not None:  # pace: the chunk goes when the events before it are due
                time.sleep(max(0.0, t0 + start / rate - time.perf_counter()))
            out = _ingest_waiting(ctx, chunk)
            totals["accepted"] += out.accepted
            totals["duplicates"] += out.duplicates
            rejected += [(int(order[start + r.row]), r.field, r.message) for r in out.rejected]
            bar.update(len(chunk))
    except Invalid as e:  # the file's columns as a whole
        _fail(f"{file}: {e}")
    except ServiceError as e:
        _service_error(e)
    except RuntimeError as e:
        # StoreUnavailable, imported only now: its module loads Feast, seconds a command that
        # never meets it must not pay.
        from api.services.errors import StoreUnavailable

        if not isinstance(e, StoreUnavailable):
            raise
        _fail(f"redis at {_shown_url(ctx.redis_url)} stopped answering ({e}); run the same "
              "command again: what went in already is recognised by its event ids")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    for row, name, message in sorted(rejected)[:5]:
        typer.echo(f"rejected row {row} {name}: {message}", err=True)
    if len(rejected) > 5:
        typer.echo(f"... and {len(rejected) - 5:,} more rejected rows", err=True)
    typer.echo(
        f"ingested {file}: {totals['accepted']:,} events accepted ({totals['duplicates']:,} "
        f"duplicates), {len(rejected):,} rejected, in {seconds:.1f}s "
        f"({totals['accepted'] / max(seconds, 1e-9):,.0f} events/s)"
    )
    if rejected:
        raise typer.Exit(1)


def _read_event_log(file: Path) -> pd.DataFrame:
    """A parquet or CSV event log; exit 2 with one line if it cannot be read."""
    if not file.is_file():
        _fail(f"event log not found: {file}" if not file.exists() else f"{file} is not a file")
    suffix = file.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        _fail(f"{file}: the extension picks the format: .parquet or .csv")
    import pandas as pd
    import pyarrow as pa

    from store_bridge.streams.records import EVENT_ID

    try:
        if suffix == ".csv":  # ids and surfaces as text: "007" must stay "007"
            return pd.read_csv(file, dtype={EVENT_ID: str, "surface": str})
        return pd.read_parquet(file)
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as e:
        _fail(f"{file}: not a readable {suffix[1:]} file ({type(e).__name__})")


def _event_time_order(frame: pd.DataFrame):
    """Row positions in event-time order (stable; times that do not parse go last, where the
    checks reject them)."""
    import numpy as np
    import pandas as pd

    from store_bridge.events.schema import EVENT_TIMESTAMP

    if EVENT_TIMESTAMP not in frame.columns:
        return np.arange(len(frame))
    ts = frame[EVENT_TIMESTAMP]
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = pd.to_datetime(ts.astype("string"), utc=True, format="ISO8601", errors="coerce")
    key = ts.astype("datetime64[us, UTC]").to_numpy(dtype="datetime64[us]").view(np.int64)
    key = np.where(ts.isna().to_numpy(), np.iinfo(np.int64).max, key)
    return np.argsort(key, kind="stable")


def _ingest_waiting(ctx: ServiceContext, chunk: pd.DataFrame):
    """`ingest` of one chunk (one stream entry), waiting with backoff while the stream is
    full: a full stream rejects the whole entry, so the same chunk is sent again."""
    from api.services.errors import Overloaded
    from api.services.events import ingest

    wait, waited = 0.2, 0.0
    while True:
        try:
            return ingest(ctx, chunk)
        except Overloaded as e:
            if waited == 0.0:
                typer.echo(f"waiting on consumers: {e}", err=True)
            time.sleep(wait)
            waited += wait
            wait = min(5.0, wait * 2)


@app.command("consume")
def consume_cmd(
    role: Annotated[str, typer.Argument(help="histories, offline, logging or join")],
    repo: RepoOpt = None,
    consumer: Annotated[
        str | None,
        typer.Option("--consumer", help="this process's name in the role's consumer group "
                                        "(default: the group's name: a restart resumes its "
                                        "pending entries)"),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="handle what the stream holds now, then exit")
    ] = False,
    lag_every: Annotated[
        float, typer.Option(min=0, help="seconds between lag reports on stderr (0: none)")
    ] = 10.0,
) -> None:
    """Run a stream consumer role: `histories` (every event into its user's online history
    in Redis), `offline` (the date-partitioned parquet log under data/events/live, exactly
    once per event), `logging` (served impressions -> TAEs of every active FM version as of
    the request time, offline and online) or `join` (feedback events joined to their
    impressions -> expert training rows under data/training_rows). Consumers acknowledge an entry only once it is handled, resume from
    their last acknowledged entry after a restart of themselves or of Redis, and report
    events handled, events/s and their group's lag. Ctrl-C or SIGTERM: the current batch is
    finished and acknowledged, then exit 0."""
    import threading

    from api.services.consumers import build_consumer, check_role
    from api.services.errors import ServiceError

    try:
        check_role(role)
    except ServiceError as e:
        _service_error(e)
    settings = _settings(repo)
    _stream_log_to_stderr()
    ctx = _context(settings, bulk=True)
    try:
        worker = build_consumer(ctx, role, consumer=consumer)
    except ServiceError as e:
        _service_error(e)
    import redis as redis_lib

    t0 = time.perf_counter()
    if once:
        try:
            worker.drain()
        except redis_lib.RedisError as e:
            _fail(f"redis at {_shown_url(ctx.redis_url)}: {e}")
        typer.echo(_consume_report(role, worker, time.perf_counter() - t0, worker.stats.events))
        return
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        if stop.is_set():  # a second signal: leave now (every consumer is idempotent)
            raise SystemExit(128 + signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if lag_every > 0:
        threading.Thread(target=_report_lag, args=(role, worker, stop, lag_every),
                         daemon=True).start()  # fmt: skip
    typer.echo(f"consume {role}: consumer {worker.consumer!r} of group {worker.group!r} "
               f"started", err=True)
    worker.run(stop)
    typer.echo(_consume_report(role, worker, time.perf_counter() - t0, worker.stats.events))


def _stream_log_to_stderr() -> None:
    """The consumers' warnings (Redis lost and retried, entries skipped) as plain lines."""
    import logging

    logger = logging.getLogger("foundex.streams")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _consume_report(role: str, worker, seconds: float, events: int) -> str:
    """One line: events handled, events/s, the group's lag (or why it is unknown)."""
    import redis as redis_lib

    try:
        lag = next((g for g in worker.stream.lag() if g.group == worker.group), None)
        lag_text = ("no lag" if lag is None else f"lag {lag.events:,} events "
                    f"({lag.pending_entries} entries pending, oldest unacknowledged "
                    f"{lag.oldest_unacked_s:.1f}s)")  # fmt: skip
    except redis_lib.RedisError as e:
        lag_text = f"lag unknown (redis: {e})"
    return (f"consume {role}: {events:,} events handled in {seconds:.1f}s "
            f"({events / max(seconds, 1e-9):,.0f} events/s); {lag_text}")


def _report_lag(role: str, worker, stop, every: float) -> None:
    """Every `every` seconds until `stop`: one lag line on stderr (events/s over the period)."""
    last, t_last = worker.stats.events, time.perf_counter()
    while not stop.wait(every):
        now, events = time.perf_counter(), worker.stats.events
        line = _consume_report(role, worker, now - t_last, events - last)
        typer.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line} (total {events:,})", err=True)
        last, t_last = events, now


@app.command("training-set")
def training_set(
    expert: Annotated[str, typer.Option(help="expert name (its config pins the FM version)")],
    entities: Annotated[
        Path,
        typer.Option(help="parquet of label rows: user_id, item_id (integers), event_timestamp "
                          "(a timestamp; without a time zone it is UTC; ISO 8601 text works, "
                          "epoch numbers do not) and one numeric column per expert task"),
    ],
    out: Annotated[
        Path,
        typer.Option(help="output: a .parquet or .csv file (rows in input order; CSV holds "
                          "embeddings as JSON arrays, empty where none), or a folder (no "
                          "extension) of parquet parts with a label_row column"),
    ],
    repo: RepoOpt = None,
    join: Annotated[
        str,
        typer.Option(help="foundex's join: auto (in memory while it fits "
                          "FOUNDEX_TRAINING_SET_MEMORY_GIB, default a quarter of RAM; else "
                          "bounded), in-memory, or bounded (one hash partition of the keys at "
                          "a time); a folder output always uses bounded"),
    ] = "auto",
    engine: Annotated[
        str,
        typer.Option(help="who joins: foundex (foundex's own join, fast) or feast (Feast's "
                          "get_historical_features on the offline store configured in "
                          "feature_store.yaml: DuckDB by default, Spark when configured); "
                          "the rows are the same"),
    ] = "foundex",
) -> None:
    """Point-in-time-correct training set for an expert: label rows joined with the pinned
    version's TAEs (latest at or before each row, within TTL) and the item features.

    Times are UTC: a timestamp without a time zone (or ISO 8601 text without an offset) is
    taken as UTC; epoch numbers are refused (their unit is ambiguous); 1970-01-01 to 2262-04-10.
    An expert pinned to a retired or deleted version is refused. Which join ran, and why, is
    printed on stderr; long builds print their progress there."""
    from api.services import offline
    from api.services.errors import Invalid, ServiceError
    from api.services.training_set_files import (
        JOINS,
        check_options,
        output_kind,
        write_training_set,
    )

    settings = _settings(repo)
    if join not in JOINS:
        _fail(f"--join {join!r}: one of {', '.join(JOINS)}")
    if engine not in offline.ENGINES:
        _fail(f"--engine {engine!r}: one of {', '.join(offline.ENGINES)}")
    if not entities.is_file():
        _fail(f"entities file not found: {entities}" if not entities.exists()
              else f"--entities {entities} is not a file")

    try:
        output_kind(out, entities=entities, repo_data=settings.repo / "data")  # before any work
        check_options(out, join=join, engine=engine)
    except Invalid as e:
        _fail(str(e))
    ctx = _context(settings)
    try:
        plan = offline.plan_training_set(ctx, expert)  # the expert and its (active) pin first
    except ServiceError as e:
        _service_error(e)
    last = [time.monotonic()]

    def progress(stage: str, done: int, total: int) -> None:  # every 5 s of a long build
        now = time.monotonic()
        if now - last[0] >= 5:
            last[0] = now
            typer.echo(f"{stage}: {done:,}/{total:,}", err=True)

    try:
        result = write_training_set(
            ctx, plan, entities, out, join=join, engine=engine, progress=progress,
            on_note=lambda note: typer.echo(f"note: {note}", err=True),
        )
    except Invalid as e:  # the label rows or the file
        _fail(str(e) if str(e).startswith(str(entities)) else f"{entities}: {e}")
    except ServiceError as e:
        _service_error(e)
    typer.echo(f"join: {result.reason}", err=True)
    where = f"{out} ({result.files} parquet parts)" if result.kind == "parts" else str(out)
    embedded = (f"{result.without_embedding:,} without an embedding" if plan.entry is not None
                else "no FM version pinned: no embedding column")
    typer.echo(f"wrote {result.rows:,} rows to {where} ({embedded})")


@fm_app.command("gc")
def fm_gc(version: str, repo: RepoOpt = None) -> None:
    """Delete a RETIRED version for good: its online rows, offline files, checkpoint and view
    (`feast apply`); refused for an active version. The manifest keeps a tombstone, so the
    name is never given to another model."""
    from api.services import lifecycle
    from api.services.errors import ServiceError
    from store_bridge.repo import view_name

    try:
        rep = lifecycle.gc(_context(_settings(repo)), version)
    except ServiceError as e:
        _service_error(e)
    typer.echo(
        f"gc {version}: {rep.online_rows:,} online rows, {rep.offline_files:,} offline files, "
        f"checkpoint {'removed' if rep.checkpoint_removed else 'absent'}; "
        f"view {view_name(version)} gone"
    )


@fm_app.command("export")
def fm_export(
    checkpoint: Annotated[Path, typer.Argument(help="FM checkpoint (.pt) from training")],
    out: Annotated[
        Path,
        typer.Argument(help="file to write the serving artifact to; its folder must exist. "
                            "Never the checkpoint itself nor a file the repo's manifest "
                            "references (a published checkpoint or serving artifact)"),
    ],
    repo: RepoOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="overwrite OUT if it exists (never a protected file)")
    ] = False,
) -> None:
    """Write the pruned serving artifact (TAE path only: no task heads, no alignment modules,
    no optimizer state); print parameter counts and file sizes of both. An existing OUT is
    kept unless --force; the files of published versions are never overwritten."""
    import zipfile

    # The cheap checks first: torch (seconds to import) only once they pass.
    if not checkpoint.exists():
        _fail(f"checkpoint not found: {checkpoint}")
    if not checkpoint.is_file():
        _fail(f"checkpoint {checkpoint} is not a file")
    if not zipfile.is_zipfile(checkpoint):  # torch.save always writes a zip archive
        _fail(f"{checkpoint} is not an FM checkpoint (not a PyTorch archive)")
    if out.is_dir():
        _fail(f"OUT {out} is a folder; give the artifact's file name, e.g. {out / 'serving.pt'}")
    if not out.parent.is_dir():
        _fail(f"OUT folder does not exist: {out.parent}")
    resolved = out.resolve()
    if resolved == checkpoint.resolve() or (out.exists() and os.path.samefile(out, checkpoint)):
        _fail(f"OUT {out} is the checkpoint being exported; write the artifact elsewhere")
    owner = _manifest_file(resolved, repo)
    if owner:
        _fail(f"OUT {out} is {owner}; write the artifact elsewhere")
    if out.exists() and not force:
        _fail(f"OUT {out} already exists; pass --force to overwrite it")

    from fm.export import export_serving, format_export_report

    try:
        report = export_serving(checkpoint, out)
    except ValueError as e:  # CheckpointError: one line naming the file
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror or e}")
    typer.echo(format_export_report(report))


def _manifest_file(path: Path, repo: Path | None) -> str | None:
    """What the repo's manifest keeps at `path` (resolved), e.g. "v1's published checkpoint",
    or None. The repo is --repo (which must be a Feast repo) or $FOUNDEX_REPO / feature_repo,
    where a missing repo or manifest protects nothing."""
    import yaml

    from store_bridge.repo import FeatureRepo

    root = _settings(repo).repo if repo is not None else Settings().repo
    feature_repo = FeatureRepo(root)
    if not feature_repo.manifest_path.is_file():
        return None
    try:
        manifest = feature_repo.load_manifest()
    except (OSError, ValueError, yaml.YAMLError) as e:  # refuse rather than guess
        _fail(f"cannot read {feature_repo.manifest_path}: {type(e).__name__}")
    for v in manifest.versions.values():
        for what, name in (("published checkpoint", v.checkpoint),
                           ("serving artifact", v.serving_artifact)):
            if not name:
                continue
            kept = (feature_repo.data / name).resolve()
            # the same inode also catches a hard link to the published file
            if kept == path or (path.exists() and kept.exists() and os.path.samefile(kept, path)):
                return f"FM version {v.version}'s {what}"
    return None


@bench_app.command("fm")
def bench_fm_cmd(
    ms: Annotated[str, typer.Option("--ms", help="candidate counts M, comma-separated")] = "1,64,512",
    ns: Annotated[str, typer.Option("--ns", help="history lengths N, comma-separated")] = "256,1024",
    repeats: Annotated[int, typer.Option(help="timings are the best of this many runs")] = 5,
    naive_max: Annotated[
        int, typer.Option(help="candidates the naive per-candidate loop runs on (0 = all M)")
    ] = 16,
    d_model: int = 64,
    layers: int = 3,
    heads: int = 4,
    device: str = "cpu",
) -> None:
    """TAE throughput (candidates/s): cached one-pass vs joint attention vs naive per-candidate
    loop, same model and inputs, TAEs checked equal first; a table, then one JSON line."""
    from fm.bench import run

    def ints(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in s.split(",") if x.strip())

    run(
        say=typer.echo, ms=ints(ms), ns=ints(ns), repeats=repeats, naive_max=naive_max,
        d_model=d_model, n_layers=layers, n_heads=heads, device=device,
    )


@bench_app.command("store")
def bench_store_cmd(
    repo: RepoOpt = None,
    rows: Annotated[int, typer.Option(min=1, help="training-set label rows")] = 1_000_000,
    candidates: Annotated[int, typer.Option(min=1, help="candidates per online read")] = 500,
    dim: Annotated[int, typer.Option(min=1, help="embedding dimension")] = 128,
    users: Annotated[int, typer.Option(min=1, help="logged rows = users x candidates")] = 40,
    repeats: Annotated[int, typer.Option(min=1, help="online reads per path (median)")] = 30,
    batch_repeats: Annotated[
        int, typer.Option(min=1, help="training-set builds and logging runs per path (best)")
    ] = 3,
    scale_rows: Annotated[
        str | None,
        typer.Option("--scale-rows",
                     help="training-set scale bench instead, at these label-row counts "
                          "(comma-separated, e.g. 1000000,10000000): in-memory, bounded and "
                          "Feast's paths, seconds and peak RSS each"),
    ] = None,
    scale_dir: Annotated[
        Path | None,
        typer.Option("--scale-dir", help="scale bench: where its data goes (default: temp dir); "
                                         "needs ~2.2 KB per label row at 128-d"),
    ] = None,
    scale_paths: Annotated[
        str, typer.Option("--scale-paths", help="scale bench: paths to run, comma-separated")
    ] = "in-memory,bounded,feast",
    mem_cap_gib: Annotated[
        float, typer.Option("--mem-cap-gib", min=0.1, help="scale bench: kill a path past this RSS")
    ] = 20.0,
    time_cap_s: Annotated[
        float, typer.Option("--time-cap-s", min=1, help="scale bench: kill a path past this time")
    ] = 900.0,
    bucket_mib: Annotated[
        int, typer.Option("--bucket-mib", min=1, help="scale bench: bounded path's working set "
                                                      "per bucket")
    ] = 1024,
) -> None:
    """Store paths vs Feast on the same data: online read (foundex vs get_online_features vs
    raw redis-py pipeline), training set (point-in-time join vs get_historical_features,
    identical rows asserted), logging (rows/s vs write_to_online_store); a table, then one
    JSON line. Each path is warmed up once; batch paths report their best of a few runs.
    Runs in a scratch copy of the repo with its own project; cleans up after.

    With --scale-rows: training sets only, at each size (--dim wide; TAE rows = label rows
    / 2), each path in its own process: seconds, peak RSS, rows identical across paths."""
    from store_bridge.bench import BenchSize, bench_store, format_table

    settings = _settings(repo)
    scale = None
    if scale_rows is not None:
        from store_bridge.bench_training_scale import ScaleConfig

        try:
            scale = ScaleConfig(
                rows=tuple(int(x.replace("_", "")) for x in scale_rows.split(",") if x.strip()),
                dim=dim, workdir=scale_dir,
                paths=tuple(p.strip() for p in scale_paths.split(",") if p.strip()),
                mem_cap_bytes=int(mem_cap_gib * 2**30), time_cap_s=time_cap_s,
                bucket_bytes=bucket_mib * 2**20,
            )
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--scale-rows/--scale-paths") from None
    size = BenchSize(
        rows=rows, candidates=candidates, dim=dim, users=users, repeats=repeats,
        batch_repeats=batch_repeats,
    )
    results = bench_store(
        _redis(settings), settings.repo, size, say=lambda s: typer.echo(s, err=True), scale=scale
    )
    typer.echo(format_table(results))
    typer.echo(json.dumps(results))


@bench_app.command("api")
def bench_api_cmd(
    items: Annotated[
        int, typer.Option(min=1, max=2000, help="candidates per compared lookup")
    ] = 500,
    dim: Annotated[int, typer.Option(min=1, help="embedding dimension")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="compared lookups per path")] = 100,
    rate: Annotated[float, typer.Option(min=1, help="load run: requests per second")] = 200.0,
    duration: Annotated[float, typer.Option(min=0.1, help="load run: seconds")] = 60.0,
    load_items: Annotated[
        int, typer.Option(min=1, max=2000, help="load run: candidates per request")
    ] = 100,
    load_format: Annotated[str, typer.Option(help="load run: json, f32 or f16")] = "json",
    keep: Annotated[bool, typer.Option(help="keep the scratch repo")] = False,
) -> None:
    """REST lookup (items x dim) through `foundex serve` vs `feast serve` on the same scratch
    repo in one run (median/p99, ratio), a fixed-rate loopback load run (p50/p99, errors) and,
    with the embedded Redis, the time to a 503 once Redis is stopped; a table, then one JSON line.
    Uses $REDIS_URL when set, else an embedded redis-server of its own."""
    from api.bench import BenchConfig, run

    if load_format not in ("json", "f32", "f16"):
        raise typer.BadParameter("json, f32 or f16", param_hint="--load-format")
    cfg = BenchConfig(
        items=items, dim=dim, repeats=repeats, rate=rate, duration=duration,
        load_items=min(load_items, items), load_format=load_format,
        redis_url=Settings().redis_url, keep=keep,
    )
    result = run(cfg, say=typer.echo)
    typer.echo(json.dumps(result))


@bench_app.command("sync")
def bench_sync_cmd(
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="delta budget, share of bytes")] = 0.3,
    steps_per_sync: Annotated[int, typer.Option(min=1, help="trainer steps between syncs")] = 10,
    repeats: Annotated[int, typer.Option(min=1, help="timings are the best of this many")] = 3,
    demo: Annotated[bool, typer.Option(help="include the demo's two FMs")] = True,
    big_items: Annotated[int, typer.Option(min=1, help="rows of the big item table")] = 1_000_000,
    updates: Annotated[int, typer.Option(min=1, help="staleness: deltas published per FM")] = 3,
    interval: Annotated[float, typer.Option(min=0.01, help="the tier's sync check, seconds")] = 1.0,
    ne_steps: Annotated[int, typer.Option(min=0, help="NE run: streaming steps (0: skip)")] = 300,
) -> None:
    """Weight sync: bytes and seconds per delta vs a full snapshot (fm.sync_bench), apply time
    in the FM serving tier and staleness (trainer step -> serving serves the new digest, with
    the tier's background check every --interval s) per FM, and the progressive NE of what
    serving holds when syncing --fraction vs all of the weights over a short streaming run;
    a table, then one JSON object as the last line. Uses $REDIS_URL when set, else an
    embedded redis-server of its own."""
    from api.bench_sync import format_report, run

    if fraction <= 0:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--fraction")
    result = run(
        fraction=fraction, steps_per_sync=steps_per_sync, repeats=repeats, demo=demo,
        big_items=big_items, updates=updates, interval=interval, ne_steps=ne_steps,
        redis_url=Settings().redis_url, say=lambda m: typer.echo(m, err=True),
    )
    typer.echo(format_report(result))
    typer.echo(json.dumps(result))


@bench_app.command("stream")
def bench_stream_cmd(
    events: Annotated[int, typer.Option(min=1, help="synthetic events ingested")] = 200_000,
    probes: Annotated[int, typer.Option(min=1, help="event-to-TAE visibility probes")] = 100,
    rest_events: Annotated[
        int, typer.Option(min=0, help="events POSTed through `foundex serve` (0: no REST peer)")
    ] = 20_000,
    feedback: Annotated[
        int, typer.Option(min=1, help="feedback events joined to served impressions")
    ] = 200,
    keep: Annotated[
        bool, typer.Option(help="keep the scratch repos, the workers' logs and (on $REDIS_URL) "
                                "the bench's keys")
    ] = False,
) -> None:
    """The live loop on a scratch repo of its own, consumers as `foundex consume` processes:
    events/s ingested and the rate at which histories and the offline log keep up (with their
    lag), beside the producer alone, one XADD per event and REST ingestion; p50/p99 event-to-TAE
    visibility and data-to-trainer latency; a table, then one JSON line. Uses $REDIS_URL when
    set (its keys deleted after), else an embedded redis-server of its own. About 1-3 minutes
    on 2 cores."""
    from api.bench_stream import StreamBenchConfig, run

    cfg = StreamBenchConfig(events=events, probes=probes, rest_events=rest_events,
                            feedback=feedback, redis_url=Settings().redis_url, keep=keep)
    result = run(cfg, say=typer.echo)
    typer.echo(json.dumps(result))


# The offline studies (paper-tables, scaling) take their dataset and seeds the same way.
StudyData = Annotated[str, typer.Option(help="synthetic, kuairand or movielens")]
StudyDataPath = Annotated[
    Path | None,
    typer.Option("--data-path", "--path", help="folder (or ratings file) of the real dataset"),
]
StudySeeds = Annotated[
    list[int] | None, typer.Option(help="seeds, e.g. --seeds 0 1 2 (default 0 1 2)")
]


def _study_inputs(
    ctx: typer.Context, data: str, data_path: Path | None, seeds: list[int] | None
) -> list[int]:
    """Check a study's --data / --data-path -> its seeds (`--seeds 0 1 2`: click keeps the
    first value, the rest arrive as extra args). Raises typer.BadParameter."""
    from experts.paper.data import DATASETS

    if data not in DATASETS:
        raise typer.BadParameter(f"one of {DATASETS}", param_hint="--data")
    if data != "synthetic" and data_path is None:
        raise typer.BadParameter(f"required with --data {data}", param_hint="--data-path")
    if data_path is not None and not data_path.exists():
        raise typer.BadParameter(f"{data_path} does not exist", param_hint="--data-path")
    try:
        return list(seeds or []) + [int(a) for a in ctx.args]
    except ValueError:
        raise typer.BadParameter(f"seeds must be integers, got {ctx.args}") from None


@app.command(
    "paper-tables", context_settings={"allow_extra_args": True, "ignore_unknown_options": False}
)
def paper_tables_cmd(
    ctx: typer.Context,
    data: StudyData = "synthetic",
    data_path: StudyDataPath = None,
    seeds: StudySeeds = None,
    time_budget: Annotated[
        float, typer.Option(min=1, help="seconds the run may take, roughly; sizes data, steps "
                            "and the large FM (real data: the ladder's xl from 900 s per seed, "
                            "else m)")
    ] = 120.0,
    out: Annotated[Path, typer.Option(help="where report.md, result.json, PNGs go")] = Path(
        "paper_tables"
    ),
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """The paper's four tables (UE/TAE vs no-FM, FM small->large with TR, unseen tasks, expert
    vs one-stage FLOPs) over several seeds, in memory; the two FMs are rungs of the `scaling`
    ladder trained by its recipe. A markdown report and PNG plots, then one JSON object as the
    last line."""
    from experts.paper.data import DataError
    from experts.paper.tables import run

    all_seeds = _study_inputs(ctx, data, data_path, seeds)
    try:
        result = run(
            data, data_path, all_seeds or [0, 1, 2], time_budget, out,
            say=typer.echo, progress=not no_progress,
        )
    except DataError as e:
        _fail(f"--data {data}: {e}")
    typer.echo((out / "report.md").read_text())
    typer.echo(json.dumps(result))


@app.command(
    "scaling", context_settings={"allow_extra_args": True, "ignore_unknown_options": False}
)
def scaling_cmd(
    ctx: typer.Context,
    data: StudyData = "synthetic",
    data_path: StudyDataPath = None,
    seeds: StudySeeds = None,
    time_budget: Annotated[
        float, typer.Option(min=1, help="seconds the sweep may take, roughly; sizes and passes")
    ] = 1800.0,
    device: Annotated[str, typer.Option(help="where the FMs train: cpu or cuda")] = "cpu",
    out: Annotated[Path, typer.Option(help="where report.md, result.json, scaling.png go")] = Path(
        "scaling"
    ),
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """FM NE and +TAE expert NE over a ladder of FM sizes (>= 30x in FLOPs), a power-law fit
    NE(C) = a*C^-b + c, TRs between sizes judged on paired seeds; a markdown report and a PNG,
    then one JSON object as the last line."""
    from experts.paper.data import DataError
    from experts.paper.scaling import run

    all_seeds = _study_inputs(ctx, data, data_path, seeds)
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("cpu or cuda", param_hint="--device")
    try:
        result = run(
            data, data_path, all_seeds or [0, 1, 2], time_budget, out,
            device=device, say=typer.echo, progress=not no_progress,
        )
    except DataError as e:
        _fail(f"--data {data}: {e}")
    typer.echo((out / "report.md").read_text())
    typer.echo(json.dumps(result))


if __name__ == "__main__":
    app()
