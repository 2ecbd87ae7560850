"""The `foundex` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from api.settings import Settings

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


def _settings(repo: Path | None) -> Settings:
    settings = Settings()
    if repo is not None:
        settings.repo = repo
    if not (settings.repo / "feature_store.yaml").exists():
        raise typer.BadParameter(f"no feature_store.yaml in {settings.repo}", param_hint="--repo")
    return settings


def _redis(settings: Settings) -> str:
    """REDIS_URL, or the embedded server (started here, stopped when this process exits)."""
    from store_bridge.redis_server import resolve_redis_url

    url, server = resolve_redis_url(settings.redis_url, settings.repo / "data")
    if server is not None:
        typer.echo(f"using embedded redis at {url} (data in {server.data_dir})", err=True)
    return url


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def demo(
    repo: RepoOpt = None,
    tiny: Annotated[bool, typer.Option(help="A very small run (seconds), as the tests use")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """The main job, end to end on synthetic data: make data, feast apply, train two FM
    versions (small v1, large v2), log both versions' TAEs, train experts pinned to each and a
    no-FM baseline, evaluate NE on a later window, print a summary table."""
    from api.pipeline import DemoSize, ne_table, run_demo
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
    typer.echo(f"stage seconds: {json.dumps(report.seconds)}")
    typer.echo(f"demo wall time: {time.perf_counter() - t0:.1f}s")
    typer.echo(f"serve it with: foundex serve --repo {settings.repo}")


@app.command()
def serve(
    repo: RepoOpt = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Run the REST service (FastAPI under uvicorn) over the repo's stores."""
    import uvicorn

    from api.app import create_app

    settings = _settings(repo)
    url = _redis(settings)
    uvicorn.run(create_app(settings, url), host=host, port=port, log_level="info")


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
def redis(repo: RepoOpt = None) -> None:
    """Keep the embedded Redis running (for `feast` by hand) and print what to export."""
    from store_bridge.redis_server import FEAST_ENV, feast_connection_string

    settings = _settings(repo)
    url = _redis(settings)
    typer.echo(f"export REDIS_URL={url}\nexport {FEAST_ENV}={feast_connection_string(url)}")
    typer.echo("Ctrl-C stops it.", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _pinned_by(settings: Settings, version: str) -> list[str]:
    from experts import load_expert_configs
    from store_bridge.repo import FeatureRepo

    repo = FeatureRepo(settings.repo)
    return [c.name for c in load_expert_configs(repo.experts_dir) if c.fm_version == version]


@fm_app.command("publish")
def fm_publish(
    checkpoint: Path,
    train_start: Annotated[str, typer.Option(help="ISO start of the training window")],
    train_end: Annotated[str, typer.Option(help="ISO end of the training window")],
    repo: RepoOpt = None,
    ttl_days: int = 7,
    description: str = "",
) -> None:
    """Publish an FM checkpoint as the next version (its own fm_tae_<v> view) and apply."""
    from store_bridge.repo import FeatureRepo
    from store_bridge.versions import VersionError, publish

    settings = _settings(repo)
    try:
        entry = publish(
            FeatureRepo(settings.repo), checkpoint, _redis(settings),
            training_window=(train_start, train_end), ttl_seconds=ttl_days * 86400,
            description=description,
        )
    except VersionError as e:
        _fail(str(e))
    typer.echo(f"published {entry.version} (dim {entry.dim}, digest {entry.digest[:12]})")


@fm_app.command("list")
def fm_list(repo: RepoOpt = None) -> None:
    """List FM versions and the experts pinned to each."""
    from store_bridge.repo import FeatureRepo

    settings = _settings(repo)
    manifest = FeatureRepo(settings.repo).load_manifest()
    if not manifest.versions:
        typer.echo("no FM versions published")
    for v in manifest.versions.values():
        pins = ", ".join(_pinned_by(settings, v.version)) or "-"
        typer.echo(f"{v.version}\t{v.status}\tdim={v.dim}\tdigest={v.digest[:12]}\tpinned by: {pins}")


@fm_app.command("retire")
def fm_retire(
    version: str,
    repo: RepoOpt = None,
    force: Annotated[bool, typer.Option(help="Retire even if experts pin it")] = False,
) -> None:
    """Mark a version retired (refused while an expert pins it, unless --force)."""
    from store_bridge.repo import FeatureRepo
    from store_bridge.versions import VersionError, retire

    settings = _settings(repo)
    try:
        retire(
            FeatureRepo(settings.repo), version, _redis(settings),
            pinned_by=_pinned_by(settings, version), force=force,
        )
    except VersionError as e:
        _fail(str(e))
    typer.echo(f"retired {version}")


@app.command("log")
def log_cmd(
    impressions: Annotated[Path, typer.Option(help="parquet of user_id, item_id, event_timestamp, surface, hour")],
    repo: RepoOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    chunk_rows: Annotated[int, typer.Option(min=1, help="rows per chunk (one file per day)")] = 20000,
) -> None:
    """Compute the TAEs of every active FM version for logged impressions; write them offline
    (partitioned parquet) and online (Redis, Feast's layout). Safe to rerun."""
    import pandas as pd

    from store_bridge.fm_tier import load_tae_function, repo_histories
    from store_bridge.logging_tier import BadEmbeddings, log_version, prepare_impressions
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.redis_server import redis_client
    from store_bridge.repo import FeatureRepo

    settings = _settings(repo)
    fr = FeatureRepo(settings.repo)
    if not impressions.is_file():
        _fail(f"impressions file not found: {impressions}")
    try:
        imp = prepare_impressions(pd.read_parquet(impressions))
    except ValueError as e:
        _fail(f"{impressions}: {e}")
    active = fr.load_manifest().active()
    if not active:
        _fail("no active FM version to log")
    histories = repo_histories(fr)
    if histories is None:
        _fail(f"no event log (events.parquet and spec.json) in {fr.events_dir}")
    store = RedisEmbeddingStore(redis_client(_redis(settings), timeout=30), fr.project)
    for entry in active:
        try:
            rep = log_version(fr, store, entry.version, load_tae_function(fr, entry, histories),
                              imp, progress=not no_progress, chunk_rows=chunk_rows)
        except BadEmbeddings as e:
            _fail(str(e))
        typer.echo(f"{entry.version}: {rep.rows:,} rows in {rep.seconds:.1f}s "
                   f"({rep.rows_per_s:,.0f} rows/s), {rep.files} files, {rep.online_written:,} online, "
                   f"{rep.skipped_chunks} chunks done by an earlier run")


@app.command("training-set")
def training_set(
    expert: Annotated[str, typer.Option(help="expert name (its config pins the FM version)")],
    entities: Annotated[Path, typer.Option(help="parquet of label rows: user_id, item_id, event_timestamp, labels")],
    out: Annotated[Path, typer.Option(help="output parquet")],
    repo: RepoOpt = None,
) -> None:
    """Point-in-time-correct training set for an expert: label rows joined with the pinned
    version's TAEs (latest at or before each row, within TTL) and the item features."""
    import pandas as pd

    from experts import load_expert_configs
    from store_bridge.repo import FeatureRepo
    from store_bridge.training_set import expert_training_set

    settings = _settings(repo)
    fr = FeatureRepo(settings.repo)
    configs = {c.name: c for c in load_expert_configs(fr.experts_dir)}
    if expert not in configs:
        _fail(f"unknown expert {expert!r} (known: {', '.join(sorted(configs)) or 'none'})")
    cfg = configs[expert]
    manifest = fr.load_manifest()
    entry = manifest.versions.get(cfg.fm_version) if cfg.fm_version else None
    if cfg.fm_version and entry is None:
        _fail(f"expert {expert} pins unknown FM version {cfg.fm_version}")
    try:
        frame = expert_training_set(fr, pd.read_parquet(entities), entry, cfg.item_features)
    except ValueError as e:
        _fail(f"{entities}: {e}")
    frame.to_parquet(out, index=False)
    n_missing = int(frame["embedding"].isna().sum()) if "embedding" in frame else 0
    typer.echo(f"wrote {len(frame):,} rows to {out} ({n_missing:,} without an embedding)")


@fm_app.command("gc")
def fm_gc(version: str, repo: RepoOpt = None) -> None:
    """Delete a RETIRED version for good: its online rows, offline files, checkpoint and
    manifest entry, then `feast apply` removes its view (refused for an active version)."""
    from store_bridge.repo import FeastApplyError, FeatureRepo
    from store_bridge.versions import VersionError, gc

    settings = _settings(repo)
    try:
        rep = gc(
            FeatureRepo(settings.repo), version, _redis(settings),
            pinned_by=_pinned_by(settings, version),
        )
    except (VersionError, FeastApplyError) as e:
        _fail(str(e))
    typer.echo(
        f"gc {version}: {rep.online_rows:,} online rows, {rep.offline_files:,} offline files, "
        f"checkpoint {'removed' if rep.checkpoint_removed else 'absent'}; view fm_tae_{version} gone"
    )


@fm_app.command("export")
def fm_export(
    checkpoint: Annotated[Path, typer.Argument(help="FM checkpoint (.pt) from training")],
    out: Annotated[Path, typer.Argument(help="where to write the serving artifact")],
) -> None:
    """Write the pruned serving artifact (TAE path only: no task heads, no alignment modules,
    no optimizer state); print parameter counts and file sizes of both."""
    from fm.export import export_serving, format_export_report

    if not checkpoint.is_file():
        _fail(f"checkpoint not found: {checkpoint}")
    try:
        report = export_serving(checkpoint, out)
    except ValueError as e:
        _fail(f"{checkpoint}: {e}")
    typer.echo(format_export_report(report))


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
) -> None:
    """Store paths vs Feast on the same data: online read (foundex vs get_online_features vs
    raw redis-py pipeline), training set (point-in-time join vs get_historical_features,
    identical rows asserted), logging (rows/s vs write_to_online_store); a table, then one
    JSON line. Each path is warmed up once; batch paths report their best of a few runs.
    Runs in a scratch copy of the repo with its own project; cleans up after."""
    from store_bridge.bench import BenchSize, bench_store, format_table

    settings = _settings(repo)
    size = BenchSize(
        rows=rows, candidates=candidates, dim=dim, users=users, repeats=repeats,
        batch_repeats=batch_repeats,
    )
    results = bench_store(_redis(settings), settings.repo, size, say=lambda s: typer.echo(s, err=True))
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


@app.command(
    "paper-tables", context_settings={"allow_extra_args": True, "ignore_unknown_options": False}
)
def paper_tables_cmd(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(help="synthetic, kuairand or movielens")] = "synthetic",
    data_path: Annotated[
        Path | None, typer.Option(help="folder (or ratings file) of the real dataset")
    ] = None,
    seeds: Annotated[
        list[int] | None, typer.Option(help="seeds, e.g. --seeds 0 1 2 (default 0 1 2)")
    ] = None,
    time_budget: Annotated[
        float, typer.Option(min=1, help="seconds the run may take, roughly; sizes data and steps")
    ] = 120.0,
    out: Annotated[Path, typer.Option(help="where report.md, result.json, PNGs go")] = Path(
        "paper_tables"
    ),
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """The paper's four tables (UE/TAE vs no-FM, FM small->large with TR, unseen tasks, expert
    vs one-stage FLOPs) over several seeds, in memory; a markdown report and PNG plots, then
    one JSON object as the last line."""
    from experts.paper_tables import DATASETS, DataError, run

    if data not in DATASETS:
        raise typer.BadParameter(f"one of {DATASETS}", param_hint="--data")
    if data != "synthetic" and data_path is None:
        raise typer.BadParameter(f"required with --data {data}", param_hint="--data-path")
    if data_path is not None and not data_path.exists():
        raise typer.BadParameter(f"{data_path} does not exist", param_hint="--data-path")
    try:  # `--seeds 0 1 2`: click keeps the first value, the rest arrive as extra args
        all_seeds = list(seeds or []) + [int(a) for a in ctx.args]
    except ValueError:
        raise typer.BadParameter(f"seeds must be integers, got {ctx.args}") from None
    try:
        result = run(
            data, data_path, all_seeds or [0, 1, 2], time_budget, out,
            say=typer.echo, progress=not no_progress,
        )
    except DataError as e:
        _fail(f"--data {data}: {e}")
    typer.echo((out / "report.md").read_text())
    typer.echo(json.dumps(result))


if __name__ == "__main__":
    app()
