"""One typed settings object for every command and process, read from ``ENCODER_*`` variables.

``REDIS_URL`` is honoured too because it is the name every other Redis tool uses.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration; every field maps to ``ENCODER_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="ENCODER_", extra="ignore")

    # --- store -----------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ENCODER_REDIS_URL", "REDIS_URL"),
        description="Redis/Valkey to use; unset starts the embedded Valkey under `home`.",
    )
    home: Path = Field(
        default=Path(".encoder-service"),
        description="Local folder for the embedded server's data and for trained model artefacts.",
    )
    embedded_port: int = Field(
        default=0, description="Port of the embedded server; 0 picks a free one."
    )
    embedding_dtype: Literal["float32", "float16"] = Field(
        default="float32", description="How published embeddings are stored."
    )
    publish_batch_size: int = Field(default=4096, ge=1, description="Users per encode+write batch.")

    # --- data and training -----------------------------------------------------------------
    data_dir: Path | None = Field(
        default=None, description="Folder holding real data sets (movielens-100k/, ciao/)."
    )
    embedding_dim: int = Field(default=64, ge=2, le=4096)
    seed: int = 0

    # --- API ---------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(default=1, ge=1)
    batch_limit: int = Field(default=1000, ge=1, description="Most ids in one batch request.")
    auth_mode: Literal["api-key", "none"] = Field(
        default="api-key", description="`none` is for local development only and logs a warning."
    )
    api_keys: str = Field(
        default="",
        description=(
            "Comma-separated `name:scope+scope:sha256hex` entries; the hex is the SHA-256 "
            "of the key, so config never holds a usable key."
        ),
    )
    api_version_cache_ttl: float = Field(
        default=1.0,
        ge=0,
        description=(
            "Seconds each API process reuses the registry's active version and manifests "
            "instead of reading them per request; a promotion shows after at most this long."
        ),
    )
    retry_after_seconds: int = Field(
        default=1, ge=0, description="`Retry-After` sent with a 503 while Redis is unreachable."
    )
    api_access_log: bool = Field(
        default=False, description="Log every request (costs a noticeable share of throughput)."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
