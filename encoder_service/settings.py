"""One typed settings object for every command and process, read from ``ENCODER_*`` variables.

``REDIS_URL`` is honoured too because it is the name every other Redis tool uses.
"""

from __future__ import annotations

import os
import socket
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
    redis_cluster: Literal["auto", "true", "false"] = Field(
        default="auto",
        description="Whether `redis_url` is a Redis Cluster node: `auto` asks the server "
        "(`INFO cluster`) when a client is created; `true` when the cluster may start after "
        "the service.",
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
    popularity_bins: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Item-popularity histogram bins in the features of a newly trained version "
        "(the `popularity` group; 0 = none). Helps tell bot-like users apart; see "
        "docs/evaluation.md before switching it on.",
    )
    item_vector_dim: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Width of the item vectors learned from co-occurrence for a newly trained "
        "version (the `item_taste` group). Wider vectors keep more of which items a user chose "
        "(128 lifts age accuracy on MovieLens-100K by about 3 points, but with an item-set "
        "weight of 100 it cost the Ciao cross-domain adapter 6-7 AUC points) and cost 12 bytes of "
        "state per user per extra dimension (docs/evaluation.md).",
    )
    item_set_weight: float = Field(
        default=30.0,
        ge=0.0,
        description="Weight of the item-set reconstruction when training a new version, in "
        "units of one normalised feature group (0 = off). Higher keeps more of which items a "
        "user chose at the expense of the behavioural groups (docs/evaluation.md).",
    )
    item_set_target: Literal["presence", "weight"] = Field(
        default="presence",
        description="What the item-set reconstruction of a new version predicts: `presence` "
        "(which items a user had events on) or `weight` (also each item's mean event weight, "
        "e.g. the rating). `weight` lifted gender and age on MovieLens-100K; with implicit "
        "feedback the two are the same (docs/evaluation.md).",
    )
    max_branch_width: int = Field(
        default=128,
        ge=16,
        le=4096,
        description="Widest hidden layer of each feature group's branches in a new version's "
        "autoencoder; a wider group is compressed inside its branch. 256 with 128-dim item "
        "vectors lifted gender and age on MovieLens-100K, and costs encoder time "
        "(docs/evaluation.md).",
    )
    ensemble_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Autoencoders trained from different seeds for a new version; more than one "
        "are aligned, averaged and distilled into one encoder, which lowers the seed-to-seed "
        "noise of the embedding for that many times the training time and the same serving "
        "cost (docs/evaluation.md).",
    )
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
            "Comma-separated `name:scope+scope:salt:digest` entries (`encoder-service keys "
            "new`); the digest is a salted HMAC-SHA256 of the key, so config never holds a "
            "usable key."
        ),
    )
    api_keys_file: Path | None = Field(
        default=None,
        description=(
            "File of more key entries (comma- or newline-separated, `#` comments), re-read "
            "when it changes and on SIGHUP: keys rotate without a restart."
        ),
    )
    api_keys_reload_seconds: float = Field(
        default=2.0, gt=0, description="How often the API checks whether the keys file changed."
    )
    cors_origins: str = Field(
        default="",
        description=(
            "Comma-separated browser origins allowed to call the API (CORS), e.g. "
            "`https://dash.example.org`; empty (the default) sends no CORS headers at all."
        ),
    )
    audit_maxlen: int = Field(
        default=100_000,
        ge=100,
        description="Approximate cap (`MAXLEN ~`) of the audit stream `{registry}:audit`.",
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
    api_max_in_flight: int = Field(
        default=256,
        ge=1,
        description="Requests one API worker works on at once; beyond it a request is refused "
        "at once with 503 `overloaded` and `Retry-After`, so accepted requests keep a bounded "
        "latency instead of queueing without bound. Probes and /metrics are never refused.",
    )
    api_max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest request body; a larger declared `Content-Length` is refused with "
        "413 before the body is read, a longer chunked body as soon as it passes the limit.",
    )
    api_body_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request body must arrive in full within this long, else 408.",
    )
    api_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A connection must deliver a request's headers within this long of opening "
        "(or of its first byte, on a kept-alive connection), else it is answered 408 and closed.",
    )
    api_keep_alive_seconds: int = Field(
        default=5, ge=1, description="An idle kept-alive connection is closed after this long."
    )
    event_max_future_seconds: float = Field(
        default=86_400.0,
        ge=0,
        description="Online events (API and streams) timestamped further than this ahead of "
        "the receiving clock are refused: one would dominate a user's time-decayed state.",
    )

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` split into origins; empty means CORS stays off."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    # --- refresher ---------------------------------------------------------------------------
    stream_shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Event streams `events:{0}` .. `events:{N-1}`; a user always maps to one "
        "(crc32 of the id), so its events stay ordered. Producers and refreshers must agree.",
    )
    stream_maxlen: int = Field(
        default=1_000_000,
        ge=1000,
        description="Approximate cap (`MAXLEN ~`) of each event stream and of `events:dead`; "
        "entries trimmed before a refresher reads them are lost.",
    )
    consumer_group: str = Field(default="refresh", description="One consumer group per deployment.")
    consumer_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This refresher's name in the group; a stable name lets a restarted "
        "process resume its own pending entries at once instead of after `claim_idle_ms`.",
    )
    batch_max_events: int = Field(default=512, ge=1, description="Flush a batch at this size.")
    batch_max_wait_ms: int = Field(
        default=20, ge=0, description="Flush a batch this long after its first event arrived."
    )
    block_ms: int = Field(
        default=1000,
        ge=1,
        le=4000,
        description="Longest XREADGROUP block; below the client's 5 s socket timeout.",
    )
    claim_idle_ms: int = Field(
        default=30_000,
        ge=1,
        description="Pending entries idle this long (a dead or stuck consumer) are claimed.",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="An entry that fails after this many deliveries goes to `events:dead`.",
    )
    idempotency_ttl_seconds: int = Field(
        default=86_400,
        ge=1,
        description="How long an event's `idempotency_key` is remembered per user.",
    )
    refresher_metrics_host: str = Field(
        default="127.0.0.1", description="Bind address of the refresher's /metrics and /readyz."
    )
    refresher_metrics_port: int = Field(
        default=9108, ge=0, description="Port of the refresher's /metrics and /readyz; 0 = none."
    )
    registry_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often the refresher looks for new or retired versions."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
