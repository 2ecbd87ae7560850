"""What the service holds between requests: the repo's files, the Redis client, loaded experts."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import redis

from api.settings import Settings
from experts import ExpertConfig, ExpertModel, load_expert, load_expert_configs
from store_bridge.feast_objects import USER_HISTORY_VIEW
from store_bridge.online import RedisEmbeddingStore, StoreUnavailable
from store_bridge.redis_server import FEAST_ENV, feast_connection_string, redis_client
from store_bridge.repo import FeatureRepo, Manifest


class NotFound(LookupError):
    pass


@dataclass
class ServingState:
    settings: Settings
    redis_url: str
    repo: FeatureRepo = field(init=False)
    _experts: dict[str, ExpertModel] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.repo = FeatureRepo(self.settings.repo)
        os.environ[FEAST_ENV] = feast_connection_string(self.redis_url)
        self.client: redis.Redis = redis_client(self.redis_url, timeout=self.settings.redis_timeout_s)
        self.store = RedisEmbeddingStore(self.client, self.repo.project)

    # The files are the truth; they are small, so they are re-read on every request and an
    # admin's `foundex fm publish` or a new expert config is seen without a restart.
    def manifest(self) -> Manifest:
        return self.repo.load_manifest()

    def expert_configs(self) -> dict[str, ExpertConfig]:
        return {c.name: c for c in load_expert_configs(self.repo.experts_dir)}

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
                self._experts[cfg.name] = load_expert(path)
            return self._experts[cfg.name]

    @cached_property
    def feature_store(self) -> Any:
        from feast import FeatureStore  # heavy import: only services that score pay for it

        return FeatureStore(repo_path=str(self.repo.path))

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


def as_int_array(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)
