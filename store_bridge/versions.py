"""FM version lifecycle: publish a checkpoint as a version, list, retire.

Publishing copies the checkpoint under `data/checkpoints/`, records it in the manifest and runs
`feast apply`, which registers the version's own `fm_tae_<version>` view.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fm import checkpoint_digest, load_checkpoint
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
    model, _ = load_checkpoint(checkpoint)  # refuse a file that is not a loadable FM
    manifest = repo.load_manifest()
    version = manifest.next_version()
    repo.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = repo.checkpoints_dir / f"{version}.pt"
    shutil.copyfile(checkpoint, target)
    entry = FMVersion(
        version=version,
        dim=model.config.d_model,
        checkpoint=str(target.relative_to(repo.data)),
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
