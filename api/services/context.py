"""The one context every use-case takes: settings, repo, Redis client, embedding store, Feast
environment and FM tier, built once per process (the server's lifespan, one CLI command)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from api.services.errors import Conflict, NotFound
from api.settings import Settings
from store_bridge.redis_server import (
    FEAST_ENV,
    bounded_retry,
    feast_connection_string,
    redis_client,
)
from store_bridge.repo import FeatureRepo, FMVersion, Manifest
from store_bridge.versions import PinError, UnknownVersion, VersionRegistry

if TYPE_CHECKING:  # torch and Feast load only when a use-case needs them (fast CLI errors)
    from experts import ExpertConfig, ExpertModel
    from store_bridge.fm_tier import FMTier
    from store_bridge.online import RedisEmbeddingStore
    from store_bridge.streams.histories import OnlineHistories
    from store_bridge.streams.impression_buffer import ImpressionBuffer
    from store_bridge.streams.stream import RedisStream

# The live loop's streams and the consumer groups that must see every entry of each (created
# with the stream, so retention waits for them from the first entry).
EVENTS_STREAM, IMPRESSIONS_STREAM = "events", "impressions"
EVENT_GROUPS = ("histories", "offline")
IMPRESSION_GROUPS = ("logging",)


class ServiceContext:
    """Shared state of the use-cases.

    Fields: `settings`; `repo` (FeatureRepo); `redis_url` (resolved on first use: the CLI
    passes a callable so that a command starts the embedded Redis only once its cheap checks
    have passed); `client` (redis-py, every call bounded by `redis_timeout_s`); `store` (the
    embedding store over it); `feature_store` (Feast's, built with the resolved connection
    string and a bounded retry); `fm_tier` (read-through's engines); `fetchers` (a small thread
    pool for concurrent reads). Manifest and expert configs are cached by file stamp, so an
    admin's publish or a new config is seen without a restart at the cost of a stat.
    """

    def __init__(
        self,
        settings: Settings,
        redis_url: str | Callable[[], str],
        *,
        redis_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.repo = FeatureRepo(settings.repo)
        self._redis_url = redis_url
        # A CLI bulk job (logging) gives a longer timeout; the service keeps its tight bounds.
        self.redis_timeout_s = redis_timeout_s or settings.redis_timeout_s
        self._connect_timeout_s = None if redis_timeout_s else settings.redis_connect_timeout_s
        self._experts: dict[str, ExpertModel] = {}
        self._lock = threading.Lock()
        self._files: dict[str, tuple[tuple, Any]] = {}

    # --- connections (lazy: a CLI command that fails its checks never starts Redis) ---

    @cached_property
    def redis_url(self) -> str:
        url = self._redis_url
        return url() if callable(url) else url

    @cached_property
    def client(self) -> redis.Redis:
        return redis_client(
            self.redis_url,
            timeout=self.redis_timeout_s,
            connect_timeout=self._connect_timeout_s,
        )

    @cached_property
    def store(self) -> RedisEmbeddingStore:
        from store_bridge.online import RedisEmbeddingStore

        return RedisEmbeddingStore(self.client, self.repo.project)

    @cached_property
    def fm_tier(self) -> FMTier:
        """Read-through's engines over the online histories, which it builds on first compute
        (so building the tier touches neither Redis nor the dataset spec)."""
        from store_bridge.fm_tier import FMTier

        return FMTier(self.repo, self._fm_histories)

    def _fm_histories(self) -> OnlineHistories | None:
        """`histories` for the FM tier: None (read-through off, with a warning) when the repo
        has no dataset spec."""
        try:
            return self.histories
        except Conflict:
            return None

    @cached_property
    def stream_client(self) -> redis.Redis:
        """A client for ingestion's appends: a batch of a thousand events is one server-side
        script of a few ms, which the lookups' tight timeout would cut off under load."""
        timeout = max(self.redis_timeout_s, self.settings.stream_write_timeout_s)
        return redis_client(self.redis_url, timeout=timeout, connect_timeout=self._connect_timeout_s)

    @cached_property
    def events_stream(self) -> RedisStream:
        """The live event stream (groups histories and offline see every event)."""
        from store_bridge.streams.stream import RedisStream

        return RedisStream(
            self.stream_client, self.repo.project, EVENTS_STREAM,
            max_entries=self.settings.stream_max_entries, dedup_s=self.settings.event_dedup_s,
            groups=EVENT_GROUPS,
        )  # fmt: skip

    @cached_property
    def impressions_stream(self) -> RedisStream:
        """Served impressions, for the logging consumer."""
        from store_bridge.streams.stream import RedisStream

        return RedisStream(
            self.client, self.repo.project, IMPRESSIONS_STREAM,
            max_entries=self.settings.stream_max_entries, dedup_s=0, groups=IMPRESSION_GROUPS,
        )  # fmt: skip

    @cached_property
    def impression_buffer(self) -> ImpressionBuffer:
        """Served impressions on their way to the impressions stream (flushed in the
        background; `close` flushes what is left)."""
        from store_bridge.streams.impression_buffer import ImpressionBuffer

        return ImpressionBuffer(
            self.impressions_stream, flush_interval_s=self.settings.impression_flush_ms / 1000,
            max_rows=self.settings.impression_buffer_rows,
            max_batch_rows=self.settings.stream_batch_events * 20,
        )  # fmt: skip

    @cached_property
    def histories(self) -> OnlineHistories:
        """Per-user recent histories in Redis, surface codes in the dataset's order. Raises
        Conflict when the repo has no dataset spec (`data/events/spec.json`)."""
        from store_bridge.events.schema import DatasetSpec
        from store_bridge.streams.histories import OnlineHistories

        spec_path = self.repo.events_dir / "spec.json"
        if not spec_path.is_file():
            raise Conflict(f"no dataset spec at {spec_path}: run `foundex demo` or load a dataset")
        spec = DatasetSpec.load(spec_path)
        return OnlineHistories(
            self.client, self.repo.project, spec.surfaces, cap=self.settings.history_cap,
            ttl_s=self.settings.history_ttl_s,
        )  # fmt: skip

    @cached_property
    def fetchers(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=4, thread_name_prefix="foundex-fetch")

    @cached_property
    def feature_store(self) -> Any:
        """Feast's FeatureStore over the repo, connected to `redis_url` with the service's
        timeout. The connection string is substituted into the repo's config here rather than
        exported as ${FOUNDEX_FEAST_REDIS}: building it changes no process-wide state."""
        import os

        import yaml
        from feast import FeatureStore  # heavy import: only what scores or demos pays for it
        from feast.repo_config import RepoConfig

        text = (self.repo.path / "feature_store.yaml").read_text()
        conn = feast_connection_string(self.redis_url, timeout=self.redis_timeout_s)
        # Other variables the file uses expand as Feast expands them; ours is put in as is
        # (never expanded again: a password may hold `$`).
        pieces = [os.path.expandvars(t) for t in text.split("${" + FEAST_ENV + "}")]
        raw = yaml.safe_load(conn.join(pieces))
        config = RepoConfig(**raw)
        config.repo_path = self.repo.path
        fs = FeatureStore(repo_path=str(self.repo.path), config=config)
        # Feast's Redis client backs off for seconds between retries by default; give it the
        # same bounded policy as foundex's own client so a hung Redis costs one timeout.
        fs.provider.online_store._get_client(fs.config.online_store).set_retry(bounded_retry())
        return fs

    def warm(self) -> None:
        """Build the shared connections now (the server, before it takes requests)."""
        _ = self.store, self.fetchers, self.fm_tier

    def close(self) -> None:
        if "impression_buffer" in self.__dict__:
            self.impression_buffer.close()
        if "fetchers" in self.__dict__:
            self.fetchers.shutdown(wait=False)
        for name in ("client", "stream_client"):
            if name in self.__dict__:
                self.__dict__[name].close()

    # --- the repo's files, re-read when they change ---

    def manifest(self) -> Manifest:
        key = _stamp([self.repo.manifest_path])
        cached = self._files.get("manifest")
        if cached is None or cached[0] != key:
            cached = (key, self.repo.load_manifest())
            self._files["manifest"] = cached
        return cached[1]

    def expert_configs(self) -> dict[str, ExpertConfig]:
        """Raises experts.ExpertConfigError for an unreadable config."""
        from experts import load_expert_configs

        d = self.repo.experts_dir
        key = _stamp([d, *sorted(d.iterdir())] if d.is_dir() else [d])
        cached = self._files.get("experts")
        if cached is None or cached[0] != key:
            cached = (key, {c.name: c for c in load_expert_configs(d)})
            self._files["experts"] = cached
        return cached[1]

    def version(self, name: str) -> FMVersion:
        """A published version; NotFound otherwise (the registry's message)."""
        try:
            return VersionRegistry(manifest=self.manifest()).get(name)
        except UnknownVersion as e:
            raise NotFound(str(e)) from None

    def expert(self, name: str) -> ExpertConfig:
        """An expert's config; NotFound otherwise."""
        configs = self.expert_configs()
        if name not in configs:
            raise NotFound(f"unknown expert {name!r}")
        return configs[name]

    def pinned_version(self, cfg: ExpertConfig, trained_dim: int | None = None) -> FMVersion:
        """The version an expert pins, after the registry's pin checks (exists; the width its
        model was trained on, when given); Conflict otherwise: the caller named a valid
        expert, it is the repo's files that disagree."""
        try:
            return VersionRegistry(manifest=self.manifest()).check_pin(
                cfg.fm_version or "", trained_dim, active=False
            )
        except PinError as e:
            raise Conflict(f"expert {cfg.name!r} {e}: re-pin its config, publish the version "
                           "or retrain the expert") from None

    def registry(self) -> VersionRegistry:
        """The FM version registry over the repo (it owns names, pins and the lifecycle)."""
        return VersionRegistry(self.repo)

    def pinned_by(self, version: str) -> list[str]:
        """Names of the experts whose config pins `version`, sorted (the registry's answer;
        raises store_bridge.versions.VersionError for an unreadable config)."""
        return self.registry().pinned_by(version)

    def expert_model(self, cfg: ExpertConfig) -> ExpertModel:
        """The trained model (loaded once); NotFound without one, Conflict when its TAE width
        disagrees with the version it pins."""
        from experts import load_expert

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
        if trained is None:
            raise Conflict(f"expert {cfg.name!r} pins FM {cfg.fm_version} but was trained "
                           "without TAEs: retrain it or re-pin its config")
        self.pinned_version(cfg, trained)

    def reload_experts(self) -> list[str]:
        """Drop loaded expert models (and FM engines): the next request loads them afresh."""
        with self._lock:
            self._experts.clear()
            self._files.clear()
        if "fm_tier" in self.__dict__:
            self.fm_tier.clear()
        return sorted(self.expert_configs())

    def online_features(self, cfg: ExpertConfig, user_id: int, item_ids: list[int]) -> dict:
        """Item features and the user's recent history from Feast's online store."""
        from store_bridge.feast_objects import USER_HISTORY_VIEW
        from store_bridge.online import StoreUnavailable

        refs = [f"item_features:{f}" for f in cfg.item_features]
        refs += [f"{USER_HISTORY_VIEW}:recent_items", f"{USER_HISTORY_VIEW}:recent_actions"]
        rows = [{"user_id": user_id, "item_id": i} for i in item_ids]
        try:
            return self.feature_store.get_online_features(features=refs, entity_rows=rows).to_dict()
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e

    def ready(self) -> tuple[bool, str]:
        from store_bridge.online import StoreUnavailable

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
