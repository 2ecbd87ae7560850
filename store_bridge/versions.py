"""FM version lifecycle: publish a checkpoint as a version, list, retire, garbage-collect.

Publishing copies the checkpoint under `data/checkpoints/`, records it in the manifest and runs
`feast apply`, which registers the version's own `fm_tae_<version>` view. Retiring marks it in
the manifest (and the view's `status` tag). Garbage collection removes a retired version for
good: its online rows, its offline files, its checkpoint, and then, through `feast apply`, its
view; the manifest keeps a tombstone so that the name is never given to another model.

Every function checks its inputs (names, files, windows, duplicates) before it imports torch or
touches Redis: `redis_url` may be a callable that starts the embedded server only once the
checks pass, so a wrong argument fails in a fraction of a second.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from store_bridge.repo import (
    VERSION_RE,
    DeletedVersion,
    FeatureRepo,
    FMVersion,
    Manifest,
    feast_apply,
    now_iso,
)

# The Redis URL, or a callable giving it (called once the cheap checks have passed).
RedisURL = str | Callable[[], str]

# Times foundex accepts: from the epoch up to where nanosecond timestamps end (pandas and
# Feast's offline joins use them), so any accepted time survives every later step.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2262, 4, 11, tzinfo=UTC)
# A training window may end this far past the clock (an end of "today" in any time zone).
FUTURE_SLACK = timedelta(days=1)

_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")


class VersionError(ValueError):
    pass


class DuplicateCheckpoint(VersionError):
    """The checkpoint is already published as a version (same sha256)."""


def _url(redis_url: RedisURL) -> str:
    return redis_url() if callable(redis_url) else redis_url


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 time (`2026-01-05`, `2026-01-05T10:00:00Z`, `...+02:00`) -> aware UTC.

    A time without an offset is taken as UTC. Raises VersionError naming `what` for text that
    is not ISO 8601, a bare number (an epoch's unit is ambiguous), or a time before
    1970-01-01 or after 2262-04-10.
    """
    text = text.strip()
    if _NUMBER.match(text):
        raise VersionError(
            f"{what} {text!r} is a number; give an ISO 8601 time such as 2026-01-05T00:00:00Z "
            "(epoch numbers are not accepted: their unit is ambiguous)"
        )
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise VersionError(
            f"{what} {text!r} is not an ISO 8601 time (e.g. 2026-01-05 or 2026-01-05T10:00:00Z)"
        ) from None
    parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if not EARLIEST <= parsed < LATEST:
        raise VersionError(
            f"{what} {text!r} is outside the supported range 1970-01-01 .. 2262-04-10 (UTC)"
        )
    return parsed


def parse_window(
    start: str, end: str, *, now: datetime | None = None
) -> tuple[str, str]:
    """A training window [start, end) as two ISO 8601 UTC strings (`+00:00`).

    Raises VersionError if either end is not a valid time (see `parse_time`), if the window
    is empty or reversed, or if it ends in the future (more than a day past `now`): a model
    cannot have trained on events that have not happened.
    """
    t0, t1 = parse_time(start, "train-start"), parse_time(end, "train-end")
    if t1 <= t0:
        raise VersionError(
            f"training window is empty or reversed: train-end {t1.isoformat()} is not after "
            f"train-start {t0.isoformat()}"
        )
    now = now or datetime.now(UTC)
    if t1 > now + FUTURE_SLACK:
        raise VersionError(f"train-end {t1.isoformat()} is in the future (now {now:%Y-%m-%d})")
    return t0.isoformat(), t1.isoformat()


def find_duplicate(manifest: Manifest, digest: str) -> FMVersion | None:
    """The published (active or retired) version whose checkpoint has this sha256, if any."""
    return next((v for v in manifest.versions.values() if v.digest == digest), None)


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()  # the same as fm.checkpoint_digest, without importing torch


def publish(
    repo: FeatureRepo,
    checkpoint: Path,
    redis_url: RedisURL,
    *,
    training_window: tuple[str, str],
    ttl_seconds: int = 7 * 86400,
    description: str = "",
    allow_duplicate: bool = False,
) -> FMVersion:
    """Publish `checkpoint` as the next version (one past any name ever used) and apply.

    `training_window` is two ISO 8601 times, stored normalised to UTC (see `parse_window`).
    Raises VersionError (one line) for a missing or foreign checkpoint file, a bad window,
    a TTL below one second; DuplicateCheckpoint (a VersionError), unless `allow_duplicate`,
    for a checkpoint whose digest an active or retired version already has (the message
    names it); FeastApplyError when
    `feast apply` fails.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise VersionError(f"checkpoint not found: {checkpoint}")
    window = parse_window(*training_window)
    if ttl_seconds < 1:
        raise VersionError(f"ttl must be at least one second, got {ttl_seconds}")
    if not zipfile.is_zipfile(checkpoint):  # torch.save writes a zip archive; sniff cheaply
        raise VersionError(f"{checkpoint} is not an FM checkpoint: not a PyTorch archive")
    manifest = repo.load_manifest()
    digest = _digest(checkpoint)
    same = find_duplicate(manifest, digest)
    if same is not None and not allow_duplicate:
        raise DuplicateCheckpoint(
            f"{checkpoint} is already published as {same.version} ({same.status}, digest "
            f"{digest[:12]}); allow duplicates (CLI --allow-duplicate, REST "
            '"allow_duplicate": true) to publish it again under a new version'
        )
    from fm import load_checkpoint  # torch: only once the cheap checks have passed
    from fm.export import export_serving

    try:
        model, _ = load_checkpoint(checkpoint)
    except ValueError as e:  # fm.checkpoint's one-line CheckpointError
        raise VersionError(str(e)) from None
    url = _url(redis_url)
    version = manifest.next_version()
    repo.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = repo.checkpoints_dir / f"{version}.pt"
    shutil.copyfile(checkpoint, target)
    # Logging and serving load only the TAE path: no task heads, no alignment modules.
    serving = repo.checkpoints_dir / f"{version}.serving.pt"
    export_serving(target, serving)
    entry = FMVersion(
        version=version,
        dim=model.config.d_model,
        checkpoint=str(target.relative_to(repo.data)),
        serving_artifact=str(serving.relative_to(repo.data)),
        digest=_digest(target),
        training_window=window,
        ttl_seconds=ttl_seconds,
        created_at=now_iso(),
        description=description,
    )
    manifest.versions[version] = entry
    repo.save_manifest(manifest)
    feast_apply(repo, url)
    return entry


def get_version(repo: FeatureRepo, version: str) -> FMVersion:
    """The manifest entry of `version`. Raises VersionError (one line) for a malformed name,
    a version that gc deleted (with when), or one never published (with the known ones)."""
    if not VERSION_RE.match(version):
        raise VersionError(f"{version!r} is not an FM version name (v1, v2, ...)")
    manifest = repo.load_manifest()
    if version in manifest.versions:
        return manifest.versions[version]
    if version in manifest.deleted:
        raise VersionError(
            f"FM version {version} was deleted by gc on {manifest.deleted[version].deleted_at}"
        )
    known = ", ".join(sorted(manifest.versions)) or "none"
    raise VersionError(f"unknown FM version {version!r} (known: {known})")


def retire(
    repo: FeatureRepo, version: str, redis_url: RedisURL, *, pinned_by: list[str],
    force: bool = False,
) -> FMVersion:
    """Mark `version` retired and apply. Raises VersionError for an unknown version or, unless
    `force`, one that experts pin (named)."""
    entry = get_version(repo, version)
    if pinned_by and not force:
        raise VersionError(
            f"FM version {version} is pinned by experts {', '.join(sorted(pinned_by))}; "
            "re-pin them first or pass --force"
        )
    url = _url(redis_url)
    manifest = repo.load_manifest()
    manifest.versions[version] = entry.model_copy(update={"status": "retired"})
    repo.save_manifest(manifest)
    feast_apply(repo, url)
    return manifest.versions[version]


@dataclass
class GCReport:
    version: str
    online_rows: int  # (user, item) hashes that held the version
    offline_files: int
    checkpoint_removed: bool


def gc(repo: FeatureRepo, version: str, redis_url: RedisURL, *, pinned_by: list[str]) -> GCReport:
    """Delete a retired version: online rows, offline files, checkpoint, view; the manifest
    entry becomes a tombstone under `deleted`, so the name is never reused.

    Refused for an active version and for one an expert still pins (a forced retire), since
    `feast apply` could not build that expert's FeatureService without the view. Each step is
    safe to repeat, and the manifest entry moves only after the data is gone, so a gc that dies
    half-way is finished by running it again.
    """
    entry = get_version(repo, version)
    if entry.status != "retired":
        raise VersionError(
            f"FM version {version} is {entry.status}; retire it first (foundex fm retire {version})"
        )
    if pinned_by:
        raise VersionError(
            f"FM version {version} is still pinned by experts {', '.join(sorted(pinned_by))}; "
            "re-pin or remove them before gc"
        )
    from store_bridge.online import RedisEmbeddingStore  # imports Feast's protos: seconds
    from store_bridge.redis_server import redis_client

    url = _url(redis_url)
    store = RedisEmbeddingStore(redis_client(url, timeout=30), repo.project)
    online = store.delete_version(version)
    tae_dir = repo.tae_dir(version)
    files = sum(1 for p in tae_dir.rglob("*") if p.is_file()) if tae_dir.exists() else 0
    shutil.rmtree(tae_dir, ignore_errors=True)
    removed = False
    for name in (entry.checkpoint, entry.serving_artifact):
        path = (repo.data / name).resolve() if name else None
        # Only copies that publish made under data/checkpoints/ are ours to delete.
        if path and path.is_file() and path.is_relative_to(repo.checkpoints_dir.resolve()):
            path.unlink()
            removed = True
    manifest = repo.load_manifest()
    del manifest.versions[version]
    manifest.deleted[version] = DeletedVersion(
        version=version, dim=entry.dim, digest=entry.digest,
        training_window=entry.training_window, created_at=entry.created_at,
        deleted_at=now_iso(), description=entry.description,
    )
    repo.save_manifest(manifest)
    # The view leaves the registry; Feast's apply also deletes the view's online rows itself.
    feast_apply(repo, url)
    return GCReport(version, online, files, removed)
