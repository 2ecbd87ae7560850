"""What the service holds between requests: the repo's files, the Redis client, loaded experts."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import redis

from api.fm_serving import FMTier
from api.settings import Settings
from experts import ExpertConfig, ExpertModel, load_expert, load_expert_configs
from store_bridge.feast_objects import USER_HISTORY_VIEW
from store_bridge.online import RedisEmbeddingStore, StoreUnavailable
from store_bridge.redis_server import (
    FEAST_ENV,
    bounded_retry,
    feast_connection_string,
    redis_client,
)
from store_bridge.repo import FeatureRepo, Manifest


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The files disagree with each other (e.g. a trained expert and the version it pins)."""


@dataclass
class ServingState:
    settings: Settings
    redis_url: str
    repo: FeatureRepo = field(init=False)
    _experts: dict[str, ExpertModel] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _files: dict[str, tuple[tuple, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.repo = FeatureRepo(self.settings.repo)
        # Feast's client (scoring reads item features and histories through it) is bounded too.
        os.environ[FEAST_ENV] = feast_connection_string(
            self.redis_url, timeout=self.settings.redis_timeout_s
        )
        self.client = redis_client(
            self.redis_url,
            timeout=self.settings.redis_timeout_s,
            connect_timeout=self.settings.redis_connect_timeout_s,
        )
        self.store = RedisEmbeddingStore(self.client, self.repo.project)
        self.fm_tier = FMTier(self.repo)

    # The files are the truth: every request checks them (a stat, not a parse) and re-reads
    # them when they changed, so an admin's `foundex fm publish` or a new expert config is
    # seen without a restart, while an unchanged manifest costs no YAML parsing on the hot path.
    def manifest(self) -> Manifest:
        key = _stamp([self.repo.manifest_path])
        cached = self._files.get("manifest")
        if cached is None or cached[0] != key:
            cached = (key, self.repo.load_manifest())
            self._files["manifest"] = cached
        return cached[1]

    def expert_configs(self) -> dict[str, ExpertConfig]:
        d = self.repo.experts_dir
        key = _stamp([d, *sorted(d.iterdir())] if d.is_dir() else [d])
        cached = self._files.get("experts")
        if cached is None or cached[0] != key:
            configs = {c.name: c for c in load_expert_configs(d)}
            cached = (key, configs)
            self._files["experts"] = cached
        return cached[1]

    def version(self, name: str):
        manifest = self.manifest()
        if name not in manifest.versions:
            raise NotFound(f"unknown FM version {name!r}")
        return manifest.versions[name]

    def expert(self, name: str) -> ExpertConfig:
        configs = self.expert_configs()
        if name not in configs:
            raise NotFound(f"unknown expert {name!r}")
        return configs[name]

    def expert_model(self, cfg: ExpertConfig) -> ExpertModel:
        with self._lock:
            if cfg.name not in self._experts:
                path = self.repo.models_dir / f"{cfg.name}.pt"
                if not path.exists():
                    raise NotFound(f"expert {cfg.name!r} has no trained model at {path}")
                model = load_expert(path)
                self._check_pin(cfg, model)
                self._experts[cfg.name] = model
            return self._experts[cfg.name]

    def _check_pin(self, cfg: ExpertConfig, model: ExpertModel) -> None:
        """A model trained on one TAE width must not be fed another version's embeddings."""
        trained = model.fm_embedding.tae_dim if model.fm_embedding is not None else None
        if cfg.fm_version is None:
            if trained is not None:
                raise Conflict(f"expert {cfg.name!r} was trained on {trained}-d TAEs but pins none")
            return
        pinned = self.version(cfg.fm_version)
        if trained != pinned.dim:
            raise Conflict(
                f"expert {cfg.name!r} pins FM {pinned.version} ({pinned.dim}-d) but its model "
                f"was trained on {trained or 'no'}-d TAEs: retrain it or re-pin its config"
            )

    def reload_experts(self) -> list[str]:
        """Drop loaded expert models (and FM engines): the next request loads them afresh."""
        with self._lock:
            self._experts.clear()
            self._files.clear()
        self.fm_tier.clear()
        return sorted(self.expert_configs())

    @cached_property
    def feature_store(self) -> Any:
        from feast import FeatureStore  # heavy import: only services that score pay for it

        fs = FeatureStore(repo_path=str(self.repo.path))
        # Feast's Redis client backs off for seconds between retries by default; give it the
        # same bounded policy as foundex's own client so a hung Redis costs one timeout.
        fs.provider.online_store._get_client(fs.config.online_store).set_retry(bounded_retry())
        return fs

    def online_features(self, cfg: ExpertConfig, user_id: int, item_ids: list[int]) -> dict:
        """Item features and the user's recent history from Feast's online store."""
        refs = [f"item_features:{f}" for f in cfg.item_features]
        refs += [f"{USER_HISTORY_VIEW}:recent_items", f"{USER_HISTORY_VIEW}:recent_actions"]
        rows = [{"user_id": user_id, "item_id": i} for i in item_ids]
        try:
            return self.feature_store.get_online_features(features=refs, entity_rows=rows).to_dict()
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e

    def ready(self) -> tuple[bool, str]:
        try:
            self.store.ping()
        except StoreUnavailable as e:
            return False, str(e)
        if not (self.repo.data / "registry.db").exists():
            return False, "feast registry not found: run `feast apply` or `foundex demo`"
        return True, "ok"


def _stamp(paths: list[Path]) -> tuple:
    """What identifies these files' contents cheaply: inode, size and mtime of each."""
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out.append((str(p), None))
            continue
        out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def as_int_array(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)
