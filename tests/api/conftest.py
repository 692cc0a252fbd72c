"""API fixtures: versions published straight into the real test Redis, and clients that reach the
app either in-process (ASGI) or over real HTTP through a uvicorn server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis
import uvicorn
from fastapi import FastAPI

from encoder_service.api.app import create_app
from encoder_service.api.auth import api_key_entry
from encoder_service.registry import Registry
from encoder_service.settings import Settings
from encoder_service.store import EmbeddingStore, decode_embedding

DIM = 16
UPDATED_AT = 1_718_000_000.5
KEYS = {"read": "test-read-key", "ingest": "test-ingest-key", "admin": "test-admin-key"}
API_KEYS = ",".join(api_key_entry(f"{scope}-client", [scope], k) for scope, k in KEYS.items())
BATCH_LIMIT = 50
TRANSPORTS = ["asgi", "http"]


def bearer(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[scope]}"}


@dataclass
class Catalog:
    """What the fixtures published: per version, each user's vector as the store returns it."""

    vectors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def users(self, version: str) -> list[str]:
        return list(self.vectors[version])


def publish(
    client: redis.Redis,
    version: str,
    users: list[str],
    *,
    dtype: str = "float32",
    seed: int = 0,
    promote: bool = False,
) -> dict[str, np.ndarray]:
    """Write random embeddings and register ``version`` (shadow, or active with ``promote``).

    Returns the vectors read back through the codec, i.e. exactly what the API must serve.
    """
    matrix = np.random.default_rng(seed).standard_normal((len(users), DIM)).astype(np.float32)
    EmbeddingStore(client).write_embeddings(
        version,
        users,
        matrix,
        dtype=dtype,  # type: ignore[arg-type]
    )
    manifest = {
        "version": version,
        "embedding_dim": DIM,
        "dtype": dtype,
        "schema_hash": f"schema-{version}",
        "created_at": f"2024-06-0{seed + 1}T00:00:00+00:00",
        "published_at": datetime.fromtimestamp(UPDATED_AT, tz=UTC).isoformat(),
        "metrics": {"reconstruction_loss": 0.1 * (seed + 1)},
        "parent_version": None,
    }
    registry = Registry(client)
    # The API never reads the model and catalogue artefacts; empty ones register the version.
    registry.register(manifest, b"", b"", by="tests")
    if promote:
        registry.promote(version, by="tests")
    raws = EmbeddingStore(client).read_embeddings(version, users)
    return {u: decode_embedding(raw, DIM, dtype) for u, raw in zip(users, raws, strict=True)}  # type: ignore[arg-type]


@pytest.fixture
def catalog(redis_client: redis.Redis) -> Catalog:
    """``v0`` retired, ``v1`` active (float32), ``v2`` shadow stored as float16."""
    published = Catalog()
    published.vectors["v0"] = publish(redis_client, "v0", ["u0", "u1"], seed=0, promote=True)
    users = [f"u{i}" for i in range(20)] + ["alice@example.org", "b:42", "c.d-e_f"]
    published.vectors["v1"] = publish(redis_client, "v1", users, seed=1, promote=True)
    Registry(redis_client).set_status("v0", "retired", by="tests")
    published.vectors["v2"] = publish(redis_client, "v2", users[:10], dtype="float16", seed=2)
    return published


def make_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "auth_mode": "api-key",
        "api_keys": API_KEYS,
        "batch_limit": BATCH_LIMIT,
        "retry_after_seconds": 2,
    }
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return make_settings(redis_url)


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@asynccontextmanager
async def api_client(
    app: FastAPI, transport: str, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app``: ``asgi`` calls it in-process (lifespan included), ``http`` through
    a real uvicorn server and TCP."""
    if transport == "asgi":
        async with app.router.lifespan_context(app):
            # Unhandled errors must reach the client as the 500 a server would send.
            asgi = httpx.ASGITransport(app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=asgi, base_url="http://api.test", headers=headers
            ) as client:
                yield client
        return
    with live_server(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
            yield client


@pytest_asyncio.fixture(loop_scope="function", params=TRANSPORTS)
async def client(
    request: pytest.FixtureRequest, settings: Settings, catalog: Catalog
) -> AsyncIterator[httpx.AsyncClient]:
    """A client holding a ``read`` key, over each transport in turn, with the catalog published."""
    async with api_client(create_app(settings), request.param, bearer("read")) as c:
        yield c
