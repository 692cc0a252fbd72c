"""The client against a real API on real Valkey: values, order, batching, errors, cache, retries."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import redis
from downstream_adapters.errors import (
    BatchTooLargeError,
    RetiredVersionError,
    StoreUnavailableError,
    UnauthenticatedError,
    UnknownUserError,
    UnknownVersionError,
    VersionMismatchError,
)

from downstream_adapters import AsyncEmbeddingClient, EmbeddingClient, Pin, RetryPolicy
from encoder_service.api.app import create_app
from encoder_service.redis_connection import sync_client
from encoder_service.store import encode_meta, meta_key
from tests.adapters.conftest import USERS, Service, publish_versions
from tests.api.conftest import KEYS, UPDATED_AT, live_server, make_settings

FAST_RETRY = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, deadline=5)


def test_fetch_returns_the_stored_vectors_in_request_order(service: Service) -> None:
    wanted = USERS[::-1][:97] + ["nobody", USERS[3]]
    with EmbeddingClient(service.url, version="v1", api_key=service.read_key, batch_size=20) as c:
        batch = c.fetch(wanted)
    assert batch.version == "v1" and batch.vectors.shape == (99, service.dim)
    assert batch.missing == ["nobody"]
    assert batch.found.tolist() == [True] * 97 + [False, True]
    np.testing.assert_array_equal(batch.vectors[:97], service.matrix("v1", wanted[:97]))
    np.testing.assert_array_equal(batch.vectors[98], service.vectors["v1"][USERS[3]])
    assert np.isnan(batch.vectors[97]).all()


def test_bulk_reads_travel_as_binary_matrices_with_update_times_on_request(
    service: Service, redis_client: redis.Redis
) -> None:
    accepts: list[str] = []
    refreshed_at = 1_800_000_000.5
    redis_client.set(meta_key(USERS[2]), encode_meta(refreshed_at, {}))
    with EmbeddingClient(service.url, version="v1", api_key=service.read_key) as client:
        client._http.event_hooks["request"].append(
            lambda r: accepts.append(r.headers["accept"]) if r.method == "POST" else None
        )
        plain = client.fetch(USERS[:4] + ["nobody"])
        timed = client.fetch(USERS[:4] + ["nobody"], updated_at=True)
    assert accepts == ["application/octet-stream"] * 2
    np.testing.assert_array_equal(timed.vectors[:4], service.matrix("v1", USERS[:4]))
    np.testing.assert_array_equal(plain.vectors, timed.vectors)
    assert plain.missing == timed.missing == ["nobody"]
    assert np.isnan(plain.updated_at).all()
    assert timed.updated_at[2] == refreshed_at
    assert np.all(timed.updated_at[[0, 1, 3]] == UPDATED_AT) and np.isnan(timed.updated_at[4])


async def test_async_bulk_reads_with_update_times(service: Service) -> None:
    async with AsyncEmbeddingClient(
        service.url, version="v2", api_key=service.read_key, batch_size=25
    ) as client:
        batch = await client.fetch(USERS[50:70], updated_at=True)
    np.testing.assert_array_equal(batch.vectors[:10], service.matrix("v2", USERS[50:60]))
    assert batch.missing == USERS[60:70]  # v2 holds the first 60 users only
    assert np.all(batch.updated_at[:10] == UPDATED_AT) and np.isnan(batch.updated_at[10:]).all()


def test_a_pinned_client_reads_its_version_not_the_active_one(service: Service) -> None:
    with EmbeddingClient(
        service.url, version="v2", api_key=service.read_key, batch_size=service.batch_limit
    ) as client:
        batch = client.fetch(USERS[:60])
        vector, updated_at = client.get(USERS[7])
        assert client.info().pin == Pin("v2", service.dim, "schema-v2")
    np.testing.assert_array_equal(batch.vectors, service.matrix("v2", USERS[:60]))
    np.testing.assert_array_equal(vector, service.vectors["v2"][USERS[7]])
    assert updated_at > 0


def test_unpinned_client_follows_the_active_version(service: Service) -> None:
    with EmbeddingClient(service.url, api_key=service.read_key) as client:
        assert client.info().pin.version == "v1"
        np.testing.assert_array_equal(
            client.fetch(USERS[:3]).vectors, service.matrix("v1", USERS[:3])
        )


def test_problems_become_typed_errors(service: Service) -> None:
    with EmbeddingClient(service.url, version="v1", api_key=service.read_key) as client:
        with pytest.raises(UnknownUserError) as caught:
            client.get("nobody")
        assert caught.value.status == 404 and "nobody" in caught.value.detail
        # Larger chunks than the server allows: the server's 413 surfaces, typed.
        client.batch_size = service.batch_limit + 1
        with pytest.raises(BatchTooLargeError):
            client.fetch(USERS[: service.batch_limit + 1])
    with pytest.raises(UnknownVersionError):
        EmbeddingClient(service.url, version="v9", api_key=service.read_key).info()
    with pytest.raises(RetiredVersionError):
        EmbeddingClient(service.url, version="v0", api_key=service.read_key).fetch(USERS[:2])
    with pytest.raises(UnauthenticatedError):
        EmbeddingClient(service.url, version="v1", api_key="wrong").info()


def test_an_expected_pin_refuses_a_different_server(service: Service) -> None:
    expected = Pin("v1", service.dim * 2, "another-schema")
    client = EmbeddingClient(service.url, api_key=service.read_key, expect=expected)
    with pytest.raises(VersionMismatchError) as caught:
        client.fetch(USERS[:2])
    message = str(caught.value)
    assert "embedding_dim: trained on 32, server has 16" in message
    assert "schema_hash: trained on 'another-schema', server has 'schema-v1'" in message


def test_the_cache_answers_repeated_reads_without_a_request(service: Service) -> None:
    requests: list[str] = []
    client = EmbeddingClient(service.url, version="v1", api_key=service.read_key, cache_ttl=60)
    client._http.event_hooks["request"].append(lambda r: requests.append(r.url.path))
    first = client.fetch(USERS[:10])
    again = client.fetch(USERS[5:10])
    assert requests.count("/v1/embeddings:batch") == 1
    np.testing.assert_array_equal(again.vectors, first.vectors[5:])
    client.fetch(USERS[5:12])  # only the two new users go over the wire
    assert requests.count("/v1/embeddings:batch") == 2
    assert client.cache is not None and len(client.cache) == 12


async def test_async_client_matches_the_sync_one(service: Service) -> None:
    async with AsyncEmbeddingClient(
        service.url, version="v1", api_key=service.read_key, batch_size=7, concurrency=3
    ) as client:
        batch = await client.fetch(USERS + ["nobody"])
        vector, _ = await client.get(USERS[1])
        with pytest.raises(UnknownVersionError):
            await AsyncEmbeddingClient(service.url, version="v9", api_key=service.read_key).info()
    np.testing.assert_array_equal(batch.vectors[:-1], service.matrix("v1", USERS))
    assert batch.missing == ["nobody"]
    np.testing.assert_array_equal(vector, service.vectors["v1"][USERS[1]])


def test_connection_errors_are_retried_then_surface() -> None:
    client = EmbeddingClient("http://127.0.0.1:9", version="v1", retry=FAST_RETRY)
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        client.info()
    assert time.monotonic() - started < 2


def test_a_503_is_retried_until_the_store_is_back(valkey_server_factory, redis_url: str) -> None:
    server = valkey_server_factory(persistent=True)
    with sync_client(server.connection_url) as redis_client:
        vectors = publish_versions(redis_client)
    settings = make_settings(server.connection_url, api_version_cache_ttl=0.0)
    with live_server(create_app(settings)) as url:
        client = EmbeddingClient(url, version="v1", api_key=KEYS["read"], retry=FAST_RETRY)
        client.info()
        server.stop()
        with pytest.raises(StoreUnavailableError) as caught:
            client.fetch(USERS[:3])
        assert caught.value.retry_after == 2
        patient = EmbeddingClient(
            url,
            version="v1",
            api_key=KEYS["read"],
            retry=RetryPolicy(attempts=50, initial=0.05, maximum=0.2, deadline=20),
        )
        patient._info = client._info
        threading.Timer(0.5, server.start).start()
        batch = patient.fetch(USERS[:3])
    np.testing.assert_array_equal(batch.vectors, np.stack([vectors["v1"][u] for u in USERS[:3]]))


def test_ingest_posts_events_with_idempotency_keys(service: Service) -> None:
    paths = httpx.get(f"{service.url}/openapi.json").json()["paths"]
    if "/v1/events" not in paths:
        pytest.skip("this build of the API has no POST /v1/events yet")
    events = [
        {"user_id": "u001", "item_id": "i1", "timestamp": 1_718_000_000 + i} for i in range(5)
    ] + [{"user_id": "bad id!", "item_id": "i1", "timestamp": 1_718_000_000}]
    with EmbeddingClient(service.url, api_key=service.ingest_key, batch_size=4) as client:
        result = client.ingest(events)
    assert result["accepted"] == 5 and len(result["ids"]) == 5
    assert [r["index"] for r in result["refused"]] == [5]
