"""FM version lifecycle: publish a checkpoint as a version, list, retire, garbage-collect.

Publishing copies the checkpoint under `data/checkpoints/`, records it in the manifest and runs
`feast apply`, which registers the version's own `fm_tae_<version>` view. Retiring marks it in
the manifest (and the view's `status` tag). Garbage collection removes a retired version for
good: its online rows, its offline files, its checkpoint, its manifest entry, and then, through
`feast apply`, its view.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fm import checkpoint_digest, load_checkpoint
from fm.export import export_serving
from store_bridge.online import RedisEmbeddingStore
from store_bridge.redis_server import redis_client
from store_bridge.repo import FeatureRepo, FMVersion, feast_apply, now_iso


class VersionError(ValueError):
    pass


def publish(
    repo: FeatureRepo,
    checkpoint: Path,
    redis_url: str,
    *,
    training_window: tuple[str, str],
    ttl_seconds: int = 7 * 86400,
    description: str = "",
) -> FMVersion:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise VersionError(f"checkpoint not found: {checkpoint}")
    try:
        model, _ = load_checkpoint(checkpoint)
    except Exception as e:  # torch raises many kinds on foreign files; all mean "not an FM"
        raise VersionError(f"{checkpoint} is not a loadable FM checkpoint: {e}") from e
    manifest = repo.load_manifest()
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
        digest=checkpoint_digest(target),
        training_window=training_window,
        ttl_seconds=ttl_seconds,
        created_at=now_iso(),
        description=description,
    )
    manifest.versions[version] = entry
    repo.save_manifest(manifest)
    feast_apply(repo, redis_url)
    return entry


def get_version(repo: FeatureRepo, version: str) -> FMVersion:
    manifest = repo.load_manifest()
    if version not in manifest.versions:
        known = ", ".join(sorted(manifest.versions)) or "none"
        raise VersionError(f"unknown FM version {version!r} (known: {known})")
    return manifest.versions[version]


def retire(
    repo: FeatureRepo, version: str, redis_url: str, *, pinned_by: list[str], force: bool = False
) -> FMVersion:
    entry = get_version(repo, version)
    if pinned_by and not force:
        raise VersionError(
            f"FM version {version} is pinned by experts {', '.join(sorted(pinned_by))}; "
            "re-pin them first or pass --force"
        )
    manifest = repo.load_manifest()
    manifest.versions[version] = entry.model_copy(update={"status": "retired"})
    repo.save_manifest(manifest)
    feast_apply(repo, redis_url)
    return manifest.versions[version]


@dataclass
class GCReport:
    version: str
    online_rows: int  # (user, item) hashes that held the version
    offline_files: int
    checkpoint_removed: bool


def gc(repo: FeatureRepo, version: str, redis_url: str, *, pinned_by: list[str]) -> GCReport:
    """Delete a retired version: online rows, offline files, checkpoint, manifest entry, view.

    Refused for an active version and for one an expert still pins (a forced retire), since
    `feast apply` could not build that expert's FeatureService without the view. Each step is
    safe to repeat, and the manifest entry goes only after the data, so a gc that dies half-way
    is finished by running it again.
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
    store = RedisEmbeddingStore(redis_client(redis_url, timeout=30), repo.project)
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
    repo.save_manifest(manifest)
    # The view leaves the registry; Feast's apply also deletes the view's online rows itself.
    feast_apply(repo, redis_url)
    return GCReport(version, online, files, removed)
