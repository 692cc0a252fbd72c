"""A real API over real Valkey for the adapter tests.

Only the set-up imports ``encoder_service`` (to publish embeddings and start uvicorn); the code
under test talks to it over HTTP like any downstream team.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis

from encoder_service.api.app import create_app
from encoder_service.registry import Registry
from tests.api.conftest import BATCH_LIMIT, DIM, KEYS, live_server, make_settings, publish

USERS = [f"u{i:03d}" for i in range(120)]


@dataclass
class Service:
    """A running API: its URL, keys, and what it serves per version."""

    url: str
    vectors: dict[str, dict[str, np.ndarray]]
    read_key: str = KEYS["read"]
    ingest_key: str = KEYS["ingest"]
    batch_limit: int = BATCH_LIMIT
    dim: int = DIM

    def matrix(self, version: str, users: list[str]) -> np.ndarray:
        return np.stack([self.vectors[version][u] for u in users])


def publish_versions(client: redis.Redis) -> dict[str, dict[str, np.ndarray]]:
    """``v1`` active on every user, ``v2`` shadow on half of them, ``v0`` retired."""
    vectors = {"v0": publish(client, "v0", USERS[:5], seed=0, promote=True)}
    vectors["v1"] = publish(client, "v1", USERS, seed=1, promote=True)
    vectors["v2"] = publish(client, "v2", USERS[:60], seed=2)
    Registry(client).set_status("v0", "retired", by="tests")
    return vectors


@pytest.fixture
def service(redis_client: redis.Redis, redis_url: str) -> Iterator[Service]:
    vectors = publish_versions(redis_client)
    with live_server(create_app(make_settings(redis_url))) as url:
        yield Service(url, vectors)
