"""FM versions: `VersionRegistry` is the one owner of their rules (lookup, the view name,
which experts pin a version, pin checks, and the lifecycle: publish, retire, garbage-collect).
The module functions `publish`, `get_version`, `retire` and `gc` are its implementation and
thin entry points; everything else (Manifest.check_pin, expert configs, Feast objects, the
API and CLI) asks the registry.

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

import hashlib
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from store_bridge.repo import (
    VERSION_RE,
    DeletedVersion,
    FeatureRepo,
    FMVersion,
    Manifest,
    feast_apply,
    now_iso,
    view_name,
)

__all__ = [
    "VERSION_RE",
    "DuplicateCheckpoint",
    "GCReport",
    "PinError",
    "UnknownVersion",
    "VersionError",
    "VersionPinned",
    "VersionRegistry",
    "gc",
    "get_version",
    "parse_time",
    "parse_window",
    "publish",
    "retire",
]

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


class UnknownVersion(VersionError):
    """No usable version by that name: malformed, never published, or deleted by gc.

    `version` is the name asked for; `deleted_at` is when gc deleted it (None otherwise)."""

    def __init__(self, message: str, version: str, deleted_at: str | None = None) -> None:
        super().__init__(message)
        self.version = version
        self.deleted_at = deleted_at


class PinError(VersionError):
    """An expert's pin that cannot be served: unknown or deleted version, a retired one, or
    another embedding width than the expert's model expects. Messages start with "pins" or
    "expects" so that callers prefix the expert (`expert feed_v2 pins ...`)."""


class VersionPinned(VersionError):
    """A retire (without force) or gc of a version that experts pin; `experts` names them."""

    def __init__(self, message: str, version: str, experts: list[str]) -> None:
        super().__init__(message)
        self.version = version
        self.experts = experts


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
    Raises VersionError (one line) for a missing or foreign checkpoint file, a serving
    artifact (`foundex fm export`'s output: publish its training checkpoint), a bad window,
    a TTL below one second; DuplicateCheckpoint (a VersionError), unless `allow_duplicate`,
    for a checkpoint whose digest an active or retired version already has (the message
    names it); FeastApplyError when `feast apply` fails.

    The checkpoint is read once for its digest and loaded once (the copy under
    data/checkpoints/ has the same bytes, so the same digest; the serving artifact is written
    from the loaded model).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise VersionError(f"checkpoint not found: {checkpoint}")
    window = parse_window(*training_window)
    if ttl_seconds < 1:
        raise VersionError(f"ttl must be at least one second, got {ttl_seconds}")
    if not zipfile.is_zipfile(checkpoint):  # torch.save writes a zip archive; sniff cheaply
        raise VersionError(f"{checkpoint} is not an FM checkpoint: not a PyTorch archive")
    # Under the manifest's lock from choosing the name to saving the entry: two publishes at
    # once get two names.
    with repo.manifest_update() as manifest:
        digest = _digest(checkpoint)
        same = find_duplicate(manifest, digest)
        if same is not None and not allow_duplicate:
            raise DuplicateCheckpoint(
                f"{checkpoint} is already published as {same.version} ({same.status}, digest "
                f"{digest[:12]}); allow duplicates (CLI --allow-duplicate, REST "
                '"allow_duplicate": true) to publish it again under a new version'
            )
        # torch: only once the cheap checks have passed
        from fm.checkpoint import load_checkpoint
        from fm.export import write_serving

        try:
            model, extra = load_checkpoint(checkpoint)
        except ValueError as e:  # fm.checkpoint's one-line CheckpointError
            raise VersionError(str(e)) from None
        if model.main_head is None:
            # A serving artifact has no heads and its digest is not its model's: publishing it
            # would give one model two versions. Publish writes its own artifact anyway.
            source = str(extra.get("source_digest", ""))
            of = find_duplicate(manifest, source) if source else None
            origin = (f"exported from {of.version}'s checkpoint, digest {source[:12]}" if of
                      else f"exported from digest {source[:12]}" if source else "no task heads")
            raise VersionError(
                f"{checkpoint} is a serving artifact ({origin}); publish the training checkpoint"
            )
        url = _url(redis_url)
        version = manifest.next_version()
        repo.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        target = repo.checkpoints_dir / f"{version}.pt"
        shutil.copyfile(checkpoint, target)
        # Logging and serving load only the TAE path: no task heads, no alignment modules.
        serving = repo.checkpoints_dir / f"{version}.serving.pt"
        write_serving(model, extra, serving, source_digest=digest)
        entry = FMVersion(
            version=version,
            dim=model.config.d_model,
            checkpoint=str(target.relative_to(repo.data)),
            serving_artifact=str(serving.relative_to(repo.data)),
            digest=digest,
            training_window=window,
            ttl_seconds=ttl_seconds,
            created_at=now_iso(),
            description=description,
        )
        manifest.versions[version] = entry
    feast_apply(repo, url)
    return entry


def get_version(repo: FeatureRepo, version: str) -> FMVersion:
    """`VersionRegistry(repo).get(version)`: raises UnknownVersion (a VersionError)."""
    return VersionRegistry(repo).get(version)


def retire(
    repo: FeatureRepo, version: str, redis_url: RedisURL, *, pinned_by: list[str] | None = None,
    force: bool = False,
) -> FMVersion:
    """`VersionRegistry(repo).retire(...)`: raises UnknownVersion, or VersionPinned (unless
    `force`) when experts pin it (`pinned_by`, or else the repo's expert configs)."""
    return VersionRegistry(repo).retire(version, redis_url, force=force, pinned_by=pinned_by)


def _retire(repo: FeatureRepo, version: str, redis_url: RedisURL) -> FMVersion:
    url = _url(redis_url)
    with repo.manifest_update() as manifest:
        entry = manifest.versions[version].model_copy(update={"status": "retired"})
        manifest.versions[version] = entry
    feast_apply(repo, url)
    return entry


@dataclass
class GCReport:
    version: str
    online_rows: int  # (user, item) hashes that held the version
    offline_files: int
    checkpoint_removed: bool


def gc(
    repo: FeatureRepo, version: str, redis_url: RedisURL, *, pinned_by: list[str] | None = None
) -> GCReport:
    """Delete a retired version: online rows, offline files, checkpoint, view; the manifest
    entry becomes a tombstone under `deleted`, so the name is never reused.

    Refused for an active version and for one an expert still pins (a forced retire), since
    `feast apply` could not build that expert's FeatureService without the view. Each step is
    safe to repeat, and the manifest entry moves only after the data is gone, so a gc that dies
    half-way is finished by running it again. See `VersionRegistry.gc`.
    """
    return VersionRegistry(repo).gc(version, redis_url, pinned_by=pinned_by)


def _gc(repo: FeatureRepo, entry: FMVersion, redis_url: RedisURL) -> GCReport:
    from store_bridge.online import RedisEmbeddingStore  # imports Feast's protos: seconds
    from store_bridge.redis_server import redis_client

    version = entry.version
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
    with repo.manifest_update() as manifest:
        del manifest.versions[version]
        manifest.deleted[version] = DeletedVersion(
            version=version, dim=entry.dim, digest=entry.digest,
            training_window=entry.training_window, created_at=entry.created_at,
            deleted_at=now_iso(), description=entry.description,
        )
    # The view leaves the registry; Feast's apply also deletes the view's online rows itself.
    feast_apply(repo, url)
    return GCReport(version, online, files, removed)


class VersionRegistry:
    """The one owner of FM versions: lookup, view names, pins and the lifecycle.

    Built from a FeatureRepo, it reads the manifest afresh on every question (another process
    may publish or retire meanwhile); built with `manifest=` it answers from that snapshot
    (pin checks of an in-memory manifest need no repo, but then pinned-by and the lifecycle
    are unavailable).
    """

    def __init__(self, repo: FeatureRepo | None = None, *, manifest: Manifest | None = None):
        if repo is None and manifest is None:
            raise TypeError("VersionRegistry needs a repo or a manifest")
        self.repo = repo
        self._snapshot = manifest

    @property
    def manifest(self) -> Manifest:
        if self._snapshot is not None:
            return self._snapshot
        return self._repo.load_manifest()

    @property
    def _repo(self) -> FeatureRepo:
        if self.repo is None:
            raise TypeError("this VersionRegistry holds a manifest only, no repo")
        return self.repo

    # ---- lookup ---------------------------------------------------------------------------

    @staticmethod
    def view_name(version: str) -> str:
        """The Feast feature view holding `version`'s TAEs (`fm_tae_<version>`)."""
        return view_name(version)

    def versions(self) -> list[FMVersion]:
        """Every published version (active and retired), in publishing order."""
        return sorted(self.manifest.versions.values(), key=lambda v: int(v.version[1:]))

    def active(self) -> list[FMVersion]:
        return [v for v in self.versions() if v.status == "active"]

    def get(self, version: str) -> FMVersion:
        """The manifest entry of `version` (active or retired).

        Raises UnknownVersion (one line): for a malformed name, "'x' is not an FM version name
        (v1, v2, ...)"; for one gc deleted, "FM version v2 was deleted by gc on <when>"; for
        one never published, "unknown FM version 'v9' (known: v1, v2)".
        """
        return self._get(self.manifest, version)

    @staticmethod
    def _get(manifest: Manifest, version: str) -> FMVersion:
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise UnknownVersion(f"{version!r} is not an FM version name (v1, v2, ...)", str(version))
        if version in manifest.versions:
            return manifest.versions[version]
        if version in manifest.deleted:
            when = manifest.deleted[version].deleted_at
            raise UnknownVersion(f"FM version {version} was deleted by gc on {when}", version, when)
        known = ", ".join(sorted(manifest.versions, key=lambda v: int(v[1:]))) or "none"
        raise UnknownVersion(f"unknown FM version {version!r} (known: {known})", version)

    # ---- pins -----------------------------------------------------------------------------

    def check_pin(
        self, version: str, expected_dim: int | None = None, *, active: bool = True
    ) -> FMVersion:
        """The entry an expert pinning `version` is served from, after the pin checks.

        Raises PinError (one line each): "pins unknown FM version 'v9' (known: ...)",
        "pins FM version 'v2', which was deleted by gc on <when> (active: ...)",
        "pins FM version 'v1', which is retired (active: ...)" (only when `active`),
        "expects 32-d embeddings but FM version 'v2' is 64-d" (when `expected_dim` is given).
        """
        manifest = self.manifest
        actives = ", ".join(v.version for v in manifest.active()) or "none"
        try:
            entry = self._get(manifest, version)
        except UnknownVersion as e:
            if e.deleted_at is None:
                raise PinError(f"pins {e}") from None
            raise PinError(
                f"pins FM version {version!r}, which was deleted by gc on {e.deleted_at} "
                f"(active: {actives})"
            ) from None
        if active and entry.status != "active":
            raise PinError(
                f"pins FM version {version!r}, which is {entry.status} (active: {actives})"
            )
        if expected_dim is not None and expected_dim != entry.dim:
            raise PinError(
                f"expects {expected_dim}-d embeddings but FM version {version!r} is {entry.dim}-d"
            )
        return entry

    def pins(self) -> dict[str, str | None]:
        """expert name -> the FM version its config pins (None: the no-FM baseline).

        Read from the `name` and `fm_version` fields of every config file in the repo's
        experts dir, without validating the rest (that is experts.config's job, and
        store_bridge does not import experts). Raises VersionError naming a file that cannot
        be read as a YAML mapping.
        """
        directory = self._repo.experts_dir
        if not directory.is_dir():
            return {}
        out: dict[str, str | None] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix not in (".yaml", ".yml"):
                continue
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as e:
                raise VersionError(f"cannot read expert config {path}: {e}") from None
            if not isinstance(data, dict):
                raise VersionError(f"expert config {path} is not a mapping")
            pin = data.get("fm_version")
            out[str(data.get("name", path.stem))] = None if pin is None else str(pin)
        return out

    def pinned_by(self, version: str) -> list[str]:
        """Names of the experts whose config pins `version`, sorted."""
        return sorted(name for name, pin in self.pins().items() if pin == version)

    def _refuse_pinned(self, version: str, pinned: list[str], hint: str) -> None:
        # The one "pinned" refusal (retire without force, gc); `hint` says how to override
        # it in the caller's terms (CLI flag or REST query).
        if pinned:
            raise VersionPinned(
                f"FM version {version} is pinned by experts {', '.join(sorted(pinned))}; {hint}",
                version, sorted(pinned),
            )

    # ---- lifecycle ------------------------------------------------------------------------

    def record_sync(self, version: str, seq: int, time: str) -> bool:
        """Record that weight-sync update `seq` of `version` was published at `time`
        (ISO-8601 UTC) in the manifest -> True; False (nothing written) when the manifest does
        not list `version` (a sync channel of an unpublished model, e.g. a scratch repo's).
        The latest call wins: the publisher only ever announces increasing seqs per channel."""
        with self._repo.manifest_update() as manifest:
            entry = manifest.versions.get(version)
            if entry is None:
                return False
            manifest.versions[version] = entry.model_copy(
                update={"sync_seq": int(seq), "sync_time": time})
        return True

    def publish(self, checkpoint: Path, redis_url: RedisURL, **kwargs: Any) -> FMVersion:
        """Publish `checkpoint` as the next version; see `publish` for the keywords and errors."""
        return publish(self._repo, checkpoint, redis_url, **kwargs)

    def retire(
        self,
        version: str,
        redis_url: RedisURL,
        *,
        force: bool = False,
        pinned_by: list[str] | None = None,
        force_hint: str = "re-pin them first or pass --force",
    ) -> FMVersion:
        """Mark `version` retired and apply. Raises UnknownVersion, or VersionPinned (unless
        `force`) when experts pin it: `pinned_by`, or else the repo's expert configs."""
        self.get(version)  # before reading expert configs or starting Redis
        pinned = self.pinned_by(version) if pinned_by is None else list(pinned_by)
        if not force:
            self._refuse_pinned(version, pinned, force_hint)
        return _retire(self._repo, version, redis_url)

    def gc(
        self, version: str, redis_url: RedisURL, *, pinned_by: list[str] | None = None
    ) -> GCReport:
        """Delete a retired version for good; see `gc`. Raises UnknownVersion, VersionError
        for an active version, VersionPinned while experts still pin it."""
        entry = self.get(version)
        if entry.status != "retired":
            raise VersionError(
                f"FM version {version} is {entry.status}; retire it first "
                f"(foundex fm retire {version})"
            )
        pinned = self.pinned_by(version) if pinned_by is None else list(pinned_by)
        self._refuse_pinned(version, pinned, "re-pin or remove them before gc")
        return _gc(self._repo, entry, redis_url)
