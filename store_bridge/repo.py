"""The Feast repo on disk and the manifest of FM versions it is built from.

The files are the truth: `feature_repo/definitions.py` builds every Feast object from
`data/fm_versions.yaml` (one entry per FM version) and from the expert config files in
`data/experts/`, so a plain `feast apply` re-registers everything foundex ever published and
nothing lives only in the registry.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field

from store_bridge.redis_server import FEAST_ENV, feast_connection_string

# The one spelling of an FM version name (v1, v2, ...); expert configs validate against it too.
VERSION_RE = re.compile(r"^v[1-9][0-9]*$")


def view_name(version: str) -> str:
    """The Feast feature view holding one FM version's TAEs."""
    return f"fm_tae_{version}"


class FMVersion(BaseModel):
    version: str = Field(pattern=VERSION_RE.pattern)
    dim: int = Field(gt=0)
    checkpoint: str  # path relative to the repo's data dir
    digest: str  # sha256 of the checkpoint file
    # the pruned serving artifact (TAE path only) that logging and serving load, relative to
    # the data dir; None: they load the full checkpoint
    serving_artifact: str | None = None
    status: Literal["active", "retired"] = "active"
    training_window: tuple[str, str]  # ISO timestamps [start, end)
    ttl_seconds: int = Field(default=7 * 86400, gt=0)
    created_at: str
    description: str = ""
    # Weight sync within this version (`store_bridge.fm_sync`): the latest update published,
    # recorded by the publisher after announcing it. None: never synced.
    sync_seq: int | None = Field(default=None, ge=0)
    sync_time: str | None = None  # when that update was published, ISO-8601 UTC

    def model_path(self, repo: FeatureRepo) -> Path:
        """What computing this version's TAEs loads: the serving artifact where there is one."""
        return repo.data / (self.serving_artifact or self.checkpoint)


class DeletedVersion(BaseModel):
    """A tombstone: what a garbage-collected version was. Its name is never given to another
    model; its data (rows, files, checkpoint, view) is gone."""

    version: str = Field(pattern=VERSION_RE.pattern)
    dim: int
    digest: str
    training_window: tuple[str, str]
    created_at: str
    deleted_at: str
    description: str = ""


class Manifest(BaseModel):
    versions: dict[str, FMVersion] = {}
    # Garbage-collected versions, kept apart from `versions` so that nothing that lists,
    # serves or registers versions ever sees them, while their names stay taken.
    deleted: dict[str, DeletedVersion] = {}

    def active(self) -> list[FMVersion]:
        return [v for v in self.versions.values() if v.status == "active"]

    def check_pin(self, fm_version: str, expected_dim: int | None = None) -> None:
        """Raise PinError (a ValueError) unless `fm_version` is published, active and
        `expected_dim`-d. The rule lives in `store_bridge.versions.VersionRegistry.check_pin`."""
        from store_bridge.versions import VersionRegistry  # versions imports this module

        VersionRegistry(manifest=self).check_pin(fm_version, expected_dim)

    def next_version(self) -> str:
        """One past the highest name ever used, deleted versions included: a name, once
        given, never names another model."""
        nums = [int(v[1:]) for v in [*self.versions, *self.deleted]]
        return f"v{max(nums, default=0) + 1}"


@dataclass(frozen=True)
class FeatureRepo:
    """Paths of one Feast repo and the state foundex keeps beside it under `data/`."""

    path: Path

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def manifest_path(self) -> Path:
        return self.data / "fm_versions.yaml"

    @property
    def experts_dir(self) -> Path:
        return self.data / "experts"

    @property
    def events_dir(self) -> Path:
        return self.data / "events"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data / "checkpoints"

    @property
    def models_dir(self) -> Path:
        return self.data / "models"

    def tae_dir(self, version: str) -> Path:
        return self.data / f"tae_{version}"

    @cached_property
    def project(self) -> str:
        """The Feast project named in feature_store.yaml, read once per FeatureRepo (the
        online store's keys embed it, so readers ask for it on every request)."""
        cfg = yaml.safe_load((self.path / "feature_store.yaml").read_text())
        return str(cfg["project"])

    def load_manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            return Manifest()
        raw = yaml.safe_load(self.manifest_path.read_text()) or {}
        return Manifest.model_validate(raw)

    @contextmanager
    def manifest_update(self) -> Iterator[Manifest]:
        """Read-modify-write of the manifest under an exclusive lock (flock on
        `data/.fm_versions.lock`): yields the manifest as it is now and saves it when the block
        ends without an exception. Publish, retire, gc and the weight-sync publisher all change
        it, possibly from different processes; without the lock one's change could overwrite
        another's (and two publishes could take the same name)."""
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.data / ".fm_versions.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
            manifest = self.load_manifest()
            yield manifest
            self.save_manifest(manifest)

    def save_manifest(self, manifest: Manifest) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".yaml.tmp")
        data = manifest.model_dump(mode="json")
        if not data["deleted"]:
            del data["deleted"]  # manifests without gc'd versions keep their old shape
        for entry in data["versions"].values():  # and versions never synced theirs
            for key in ("sync_seq", "sync_time"):
                if entry.get(key) is None:
                    entry.pop(key, None)
        tmp.write_text(yaml.safe_dump(data, sort_keys=True))
        os.replace(tmp, self.manifest_path)  # atomic: a crash never leaves half a manifest


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FeastApplyError(RuntimeError):
    pass


def feast_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env[FEAST_ENV] = feast_connection_string(redis_url)
    return env


def feast_apply(repo: FeatureRepo, redis_url: str) -> str:
    """Run `feast apply` on the repo exactly as a user would, with the Redis address exported."""
    feast_bin = Path(sys.executable).with_name("feast")
    cmd = [str(feast_bin) if feast_bin.exists() else "feast", "apply"]
    proc = subprocess.run(
        cmd, cwd=repo.path, env=feast_env(redis_url), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise FeastApplyError(f"feast apply failed in {repo.path}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
