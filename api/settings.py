"""Typed settings for the CLI and the service, read from the environment (FOUNDEX_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOUNDEX_", extra="ignore")

    # REDIS_URL is the ecosystem's name, so it is read without the prefix.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    repo: Path = Path("feature_repo")

    # Limits: more candidates than this -> 422; a larger request body -> 413.
    max_candidates: int = Field(default=2000, gt=0)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)

    # Every store call is bounded: a dead or hung Redis turns into a 503 within ~100 ms.
    redis_timeout_s: float = Field(default=0.08, gt=0)
    redis_connect_timeout_s: float = Field(default=0.05, gt=0)

    # Bearer tokens. Admin endpoints are refused while admin_token is unset; read endpoints
    # are open unless read_token is set (the admin token is accepted there too).
    admin_token: SecretStr | None = None
    read_token: SecretStr | None = None

    # Read-through: TAEs missing from Redis are computed by the FM tier and written back.
    read_through: bool = True
    # Fresh TAEs: with read-through on, a stored row older than the user's newest event in the
    # online histories is computed again (and written back) rather than served as stored.
    refresh_stale: bool = True

    # Structured (JSON) request logs on the "foundex.api" logger.
    json_logs: bool = True

    # The live loop (Redis Streams; see store_bridge/streams). A stream holds at most this
    # many entries (record batches of up to `stream_batch_events` events) that some consumer
    # group has not acknowledged; past that, ingestion answers 429 instead of dropping.
    stream_max_entries: int = Field(default=20_000, gt=0)
    stream_batch_events: int = Field(default=1000, gt=0)
    # Appends of ingested events may take longer than a lookup's store call (redis_timeout_s).
    stream_write_timeout_s: float = Field(default=2.0, gt=0)
    # An event id seen within this many seconds is not ingested again (client retries).
    event_dedup_s: int = Field(default=600, ge=0)
    # Online histories: events kept per user (>= every FM's max_history), and how long an
    # inactive user's history is kept (0: forever).
    history_cap: int = Field(default=256, gt=0)
    history_ttl_s: int = Field(default=0, ge=0)
    # Served impressions go to the impressions stream for the logging consumer, through an
    # in-memory buffer flushed every impression_flush_ms (a SIGKILL loses at most that much)
    # and bounded to impression_buffer_rows (past it, impressions are counted as not logged).
    log_served_impressions: bool = True
    impression_flush_ms: int = Field(default=20, gt=0)
    impression_buffer_rows: int = Field(default=200_000, gt=0)
    # Feedback joins its impression when it arrives within this many seconds of the request.
    join_window_s: int = Field(default=1800, gt=0)

    # Training sets (`foundex training-set`): the in-memory join runs while its estimated peak
    # fits this budget (GiB; unset: a quarter of physical memory), else the bounded join, whose
    # partitions each hold about training_set_bucket_mib MiB of work.
    training_set_memory_gib: float | None = Field(default=None, gt=0)
    training_set_bucket_mib: int = Field(default=1024, gt=0)

    def training_set_budget_bytes(self) -> int:
        """The in-memory join's budget in bytes (see training_set_memory_gib)."""
        if self.training_set_memory_gib is not None:
            return int(self.training_set_memory_gib * 2**30)
        from store_bridge.training_set_partitioned import default_memory_budget

        return default_memory_budget()
