"""``POST /v1/events``: validation with the offline contract, auth, and the path to a fresh
embedding through the API while a refresher runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis

from encoder_service.api.app import create_app
from encoder_service.api.auth import api_key_entry
from encoder_service.data.contract import Event
from encoder_service.encoder import Encoder
from encoder_service.events import stream_for, stream_key
from encoder_service.settings import Settings
from tests.refresher.conftest import (
    RefresherFactory,
    expected_embedding,
    replay_once,
    running,
)

KEYS = {"ingest": "test-ingest-key", "read": "test-read-key"}
API_KEYS = ",".join(api_key_entry(f"{scope}-client", [scope], k) for scope, k in KEYS.items())
BATCH_LIMIT = 20
SHARDS = 2
PROBLEM_JSON = "application/problem+json"


def bearer(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[scope]}"}


@pytest_asyncio.fixture(loop_scope="function")
async def api(redis_client: redis.Redis, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        redis_url=redis_url,
        api_keys=API_KEYS,
        batch_limit=BATCH_LIMIT,
        stream_shards=SHARDS,
        api_version_cache_ttl=0,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            yield client


VALID = {"user_id": "u1", "item_id": "i1", "timestamp": 1718000000.5, "event_type": "view"}


async def test_valid_events_are_appended_to_their_users_streams(
    api: httpx.AsyncClient, redis_client: redis.Redis
) -> None:
    events = [
        VALID,
        {
            "user_id": "alice@example.org",
            "item_id": "i2",
            "timestamp": "2024-06-10T08:00:00Z",
            "weight": 3,
            "context": "tv",
            "categories": ["drama", "comedy"],
            "profile": {"age": 31, "country": "FR"},
            "idempotency_key": "k1",
        },
    ]
    response = await api.post("/v1/events", json={"events": events}, headers=bearer("ingest"))

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 2 and body["refused"] == [] and len(body["ids"]) == 2
    ((entry_id, fields),) = redis_client.xrange(
        stream_for("alice@example.org", SHARDS), min=body["ids"][1], max=body["ids"][1]
    )
    assert entry_id.decode() == body["ids"][1]
    assert fields[b"timestamp"] == b"1718006400.0" and fields[b"categories"] == b"drama|comedy"
    assert fields[b"profile"] == b'{"age":31.0,"country":"FR"}'
    assert fields[b"idempotency_key"] == b"k1" and fields[b"weight"] == b"3.0"


async def test_invalid_events_are_refused_one_by_one_with_field_and_reason(
    api: httpx.AsyncClient, redis_client: redis.Redis
) -> None:
    events = [
        {**VALID, "timestamp": "yesterday"},
        VALID,
        {**VALID, "user_id": "has space"},
        "not an object",
        {**VALID, "weight": -2},
    ]
    response = await api.post("/v1/events", json={"events": events}, headers=bearer("ingest"))

    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 1
    assert [(r["index"], r["field"]) for r in body["refused"]] == [
        (0, "timestamp"),
        (2, "user_id"),
        (3, None),
        (4, "weight"),
    ]
    assert all(r["reason"] for r in body["refused"])
    assert sum(redis_client.xlen(stream_key(s)) for s in range(SHARDS)) == 1


async def test_a_batch_without_a_valid_event_is_a_422_problem(api: httpx.AsyncClient) -> None:
    events = [{**VALID, "item_id": None}, {**VALID, "timestamp": 9e9}]
    response = await api.post("/v1/events", json={"events": events}, headers=bearer("ingest"))

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["type"] == "urn:encoder-service:problem:invalid-request"
    assert [e["loc"] for e in problem["errors"]] == [
        ["body", "events", 0, "item_id"],
        ["body", "events", 1, "timestamp"],
    ]


@pytest.mark.parametrize(
    ("body", "status"),
    [({"events": []}, 422), ({"events": [VALID] * (BATCH_LIMIT + 1)}, 413), ({}, 422)],
)
async def test_malformed_or_oversized_requests_are_problems(
    api: httpx.AsyncClient, body: dict, status: int
) -> None:
    response = await api.post("/v1/events", json=body, headers=bearer("ingest"))
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON


async def test_ingesting_needs_the_ingest_scope(api: httpx.AsyncClient) -> None:
    body = {"events": [VALID]}
    assert (await api.post("/v1/events", json=body)).status_code == 401
    refused = await api.post("/v1/events", json=body, headers=bearer("read"))
    assert refused.status_code == 403 and refused.json()["scope"] == "ingest"


async def test_openapi_documents_the_event_fields(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/events"]["post"]
    assert {"202", "401", "403", "413", "422", "503"} <= set(operation["responses"])
    schema = spec["components"]["schemas"]["EventBatch"]["properties"]["events"]["items"]
    assert {"user_id", "item_id", "timestamp", "profile", "idempotency_key"} <= set(
        schema["properties"]
    )


async def test_a_posted_event_is_readable_through_the_api_within_a_second(
    api: httpx.AsyncClient,
    encoders: dict[str, Encoder],
    make_refresher: RefresherFactory,
) -> None:
    posted = {
        "user_id": "api-newcomer",
        "item_id": "i5",
        "timestamp": 1718000000.0,
        "profile": {"age": 25, "country": "DE"},
    }
    path = "/v1/users/api-newcomer/embedding"
    assert (await api.get(path, headers=bearer("read"))).status_code == 404
    with running(make_refresher(shards=SHARDS)):
        sent = time.time()
        response = await api.post("/v1/events", json={"events": [posted]}, headers=bearer("ingest"))
        assert response.status_code == 202
        read = None
        for _ in range(250):  # up to 5 s
            read = await api.get(path, headers=bearer("read"))
            if read.status_code == 200:
                break
            await asyncio.sleep(0.02)
        seen = time.time()
    assert read is not None and read.status_code == 200
    assert seen - sent < 1.0
    event = Event("api-newcomer", "i5", 1718000000.0, profile={"age": 25.0, "country": "DE"})
    expected = expected_embedding(encoders["v1"], replay_once(None, [event], encoders["v1"]))
    body = read.json()
    assert np.asarray(body["embedding"], dtype=np.float32).tobytes() == expected.tobytes()
    assert sent <= body["updated_at"] <= seen
    for version in ("v1", "v2"):
        versioned = await api.get(f"{path}?version={version}", headers=bearer("read"))
        assert versioned.status_code == 200
