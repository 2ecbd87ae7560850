"""The `foundex` command line."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from api.settings import Settings

# ibis (under Feast's DuckDB store) warns about its own use of a deprecated DuckDB call.
warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated")

app = typer.Typer(
    help="foundex: a Feast-centred embedding service for the Foundation-Expert paradigm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
fm_app = typer.Typer(help="FM versions: publish, list, retire.", no_args_is_help=True)
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
) -> None:
    """Compute the TAEs of every active FM version for logged impressions; write them offline
    (partitioned parquet) and online (Redis, Feast's layout). Safe to rerun."""
    import pandas as pd

    from fm import UserHistories
    from store_bridge.fm_tier import load_tae_function
    from store_bridge.logging_tier import log_version, prepare_impressions
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
    from store_bridge.events.schema import DatasetSpec

    spec = DatasetSpec.load(fr.events_dir / "spec.json")
    events = pd.read_parquet(fr.events_dir / "events.parquet")
    histories = UserHistories.from_events(events, spec.surfaces)
    store = RedisEmbeddingStore(redis_client(_redis(settings), timeout=30), fr.project)
    for entry in active:
        rep = log_version(fr, store, entry.version, load_tae_function(fr, entry, histories), imp,
                          progress=not no_progress)
        typer.echo(f"{entry.version}: {rep.rows:,} rows in {rep.seconds:.1f}s "
                   f"({rep.rows_per_s:,.0f} rows/s), {rep.files} files, {rep.online_written:,} online")


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


if __name__ == "__main__":
    app()
