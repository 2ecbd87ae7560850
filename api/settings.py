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

    # Structured (JSON) request logs on the "foundex.api" logger.
    json_logs: bool = True
