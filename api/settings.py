"""Typed settings for the CLI and the service, read from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOUNDEX_", extra="ignore")

    # REDIS_URL is the ecosystem's name, so it is read without the prefix.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    repo: Path = Path("feature_repo")
    max_candidates: int = Field(default=2000, gt=0)
    redis_timeout_s: float = Field(default=0.5, gt=0)
