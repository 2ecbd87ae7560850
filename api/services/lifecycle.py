"""FM version lifecycle as use-cases: list, publish, retire, gc. The version registry
(`store_bridge.versions`) owns the rules; this module turns its errors into domain errors,
so that both faces map them the same way (and a failed `feast apply` in one place)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid, NotFound, Unavailable
from fm.timefeatures import iso_utc
from store_bridge.repo import DeletedVersion, FeastApplyError, FMVersion
from store_bridge.versions import (
    DuplicateCheckpoint,
    GCReport,
    UnknownVersion,
    VersionError,
    VersionPinned,
)

log = logging.getLogger("foundex.api")


@contextmanager
def _domain_errors(other: type[Exception]) -> Iterator[None]:
    """Registry errors -> domain errors: unknown -> NotFound, pinned or duplicate ->
    Conflict, any other VersionError -> `other`, a failed `feast apply` -> Unavailable."""
    try:
        yield
    except UnknownVersion as e:
        raise NotFound(str(e)) from e
    except (VersionPinned, DuplicateCheckpoint) as e:
        raise Conflict(str(e)) from e
    except VersionError as e:
        raise other(str(e)) from e
    except FeastApplyError as e:
        text = str(e)
        raise Unavailable(f"feast apply failed: {text.splitlines()[0] if text else ''}",
                          details=text) from e


@dataclass
class SyncInfo:
    """The latest weight-sync update published for a version (`store_bridge.fm_sync`)."""

    seq: int
    time: str  # when it was published, ISO-8601 UTC
    kind: str | None = None  # "delta" | "snapshot"; None when read from the manifest
    step: int | None = None  # the trainer's step; None when read from the manifest


@dataclass
class Listed:
    """One published version, the experts pinning it, and its latest sync (None: never
    synced, or Redis could not be read: logged)."""

    entry: FMVersion
    pinned_by: list[str]
    sync: SyncInfo | None = None


@dataclass
class VersionListing:
    versions: list[Listed]
    deleted: list[DeletedVersion]


def sync_infos(ctx: ServiceContext, entries: list[FMVersion]) -> dict[str, SyncInfo | None]:
    """Each version's latest published sync update: from its announcements in Redis (one read
    each), else as the manifest recorded it (None: never synced). A Redis error is logged and
    leaves the manifest's record: listing versions does not depend on Redis."""
    import redis

    from store_bridge.fm_sync import SyncReader

    live: dict[str, SyncInfo] = {}
    try:
        for e in entries:
            a = SyncReader(ctx.repo, ctx.client, e.version).latest()
            if a is not None:
                live[e.version] = SyncInfo(a.seq, iso_utc(a.time_us), a.kind, a.step)
    except redis.RedisError as err:
        log.warning("FM versions listed with the manifest's sync record: Redis: %s", err)
        live = {}
    return {e.version: live.get(e.version) or (
        SyncInfo(e.sync_seq, e.sync_time or "") if e.sync_seq is not None else None)
        for e in entries}


def list_versions(ctx: ServiceContext, *, with_sync: bool = True) -> VersionListing:
    """Published versions (manifest order) with the experts pinning each and (`with_sync`)
    each one's latest weight sync, then tombstones."""
    manifest = ctx.manifest()
    pins = ctx.registry().pins() if manifest.versions else {}
    syncs = sync_infos(ctx, list(manifest.versions.values())) if with_sync else {}
    listed = [Listed(v, sorted(n for n, p in pins.items() if p == v.version), syncs.get(v.version))
              for v in manifest.versions.values()]
    return VersionListing(listed, list(manifest.deleted.values()))


def publish(
    ctx: ServiceContext, checkpoint: Path, *, training_window: tuple[str, str],
    ttl_seconds: int, description: str = "", allow_duplicate: bool = False,
) -> FMVersion:
    """Publish a checkpoint as the next version and apply. Raises Conflict (already
    published), Invalid (a bad file, a serving artifact, window or TTL), Unavailable (feast
    apply failed)."""
    with _domain_errors(Invalid):
        try:
            return ctx.registry().publish(
                Path(checkpoint), lambda: ctx.redis_url, training_window=training_window,
                ttl_seconds=ttl_seconds, description=description,
                allow_duplicate=allow_duplicate,
            )
        except (ValueError, OSError) as e:
            if isinstance(e, VersionError):
                raise
            raise VersionError(f"cannot publish {checkpoint}: {e}") from e


@dataclass
class Retired:
    entry: FMVersion
    pinned_by: list[str]  # experts that pinned it (non-empty only when forced)

    @property
    def forced(self) -> bool:
        return bool(self.pinned_by)


def retire(ctx: ServiceContext, version: str, *, force: bool = False,
           force_hint: str = "re-pin them first or pass --force") -> Retired:
    """Mark a version retired and apply. Raises NotFound, Conflict (pinned and not
    `force`, or not retirable), Unavailable. `force_hint` says how to override, in the
    caller's terms."""
    with _domain_errors(Conflict):
        registry = ctx.registry()
        registry.get(version)  # an unknown name fails before expert configs are read
        pinned = registry.pinned_by(version)
        entry = registry.retire(version, lambda: ctx.redis_url, force=force, pinned_by=pinned,
                                force_hint=force_hint)
    return Retired(entry, pinned)


def gc(ctx: ServiceContext, version: str) -> GCReport:
    """Delete a retired version for good. Raises NotFound, Conflict (active, or pinned),
    Unavailable."""
    with _domain_errors(Conflict):
        return ctx.registry().gc(version, lambda: ctx.redis_url)
