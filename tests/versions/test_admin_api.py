"""Admin endpoints and read tracking over real HTTP (and in-process ASGI) on a real Valkey."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import redis

from encoder_service.api.app import create_app
from encoder_service.registry import Registry
from encoder_service.settings import Settings
from tests.api.conftest import TRANSPORTS, Catalog, api_client, bearer

PROBLEM = "urn:encoder-service:problem:"


@pytest_asyncio.fixture(loop_scope="function", params=TRANSPORTS)
async def admin(
    request: pytest.FixtureRequest, settings: Settings, catalog: Catalog
) -> AsyncIterator[httpx.AsyncClient]:
    """A client holding the ``admin`` key; requests may override the header with another key."""
    async with api_client(create_app(settings), request.param, bearer("admin")) as c:
        yield c


async def test_admin_moves_need_the_admin_scope(admin: httpx.AsyncClient) -> None:
    response = await admin.post("/v1/admin/versions/v2/promote", headers=bearer("read"))
    assert response.status_code == 403
    assert response.json()["scope"] == "admin"
    anonymous = await admin.post("/v1/admin/rollback", headers={"Authorization": ""})
    assert anonymous.status_code == 401


async def test_promote_and_rollback_record_the_key_and_switch_reads(
    admin: httpx.AsyncClient, redis_client: redis.Redis, catalog: Catalog
) -> None:
    promoted = await admin.post("/v1/admin/versions/v2/promote")
    assert promoted.status_code == 200
    body = promoted.json()
    assert body["status"] == "active"
    assert body["status_history"][-1] == {**body["status_history"][-1], "by": "admin-client"}
    # The process that made the move reads the new active version at once (cache invalidated).
    read = await admin.get("/v1/users/u3/embedding", headers=bearer("read"))
    assert read.json()["version"] == "v2"
    back = await admin.post("/v1/admin/rollback")
    assert back.status_code == 200 and back.json()["version"] == "v1"
    assert Registry(redis_client).active() == "v1"
    assert Registry(redis_client).get("v2")["status"] == "deprecated"  # type: ignore[index]


async def test_refusals_are_problems(admin: httpx.AsyncClient) -> None:
    active = await admin.post("/v1/admin/versions/v1/retire")
    assert active.status_code == 409
    assert active.json()["type"] == PROBLEM + "invalid-transition"
    retired = await admin.post("/v1/admin/versions/v0/promote")
    assert retired.status_code == 409 and "retired" in retired.json()["detail"]
    unknown = await admin.post("/v1/admin/versions/v9/deprecate")
    assert unknown.status_code == 404
    assert unknown.json()["type"] == PROBLEM + "unknown-version"


async def test_retire_is_refused_while_a_key_reads_the_version_and_names_it(
    admin: httpx.AsyncClient,
) -> None:
    # Reads through the fast path, the FastAPI route (binary via .npy) and the batch endpoint.
    for _ in range(3):
        read = await admin.get("/v1/users/u1/embedding?version=v2", headers=bearer("read"))
        assert read.is_success
    npy = {**bearer("read"), "Accept": "application/x-npy"}
    assert (await admin.get("/v1/users/u2/embedding?version=v2", headers=npy)).is_success
    batch = {"user_ids": ["u1", "u2", "nobody"], "version": "v2"}
    assert (await admin.post("/v1/embeddings:batch", json=batch, headers=bearer("read"))).is_success
    await asyncio.sleep(1.5)  # the API flushes its in-memory counts every second

    readers = (await admin.get("/v1/admin/versions/v2/readers")).json()["readers"]
    assert [(r["client"], r["reads"]) for r in readers] == [("read-client", 6)]
    refused = await admin.post("/v1/admin/versions/v2/retire")
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["type"] == PROBLEM + "version-in-use"
    assert "read-client" in problem["detail"]
    assert [r["client"] for r in problem["readers"]] == ["read-client"]
    assert (await admin.post("/v1/admin/versions/v2/deprecate")).json()["status"] == "deprecated"

    forced = await admin.post("/v1/admin/versions/v2/retire?force=true")
    assert forced.status_code == 200
    assert forced.json()["status_history"][-1]["forced_past"] == ["read-client"]
    gone = await admin.get("/v1/users/u1/embedding?version=v2", headers=bearer("read"))
    assert gone.status_code == 410


async def test_an_unread_version_retires_without_force(admin: httpx.AsyncClient) -> None:
    response = await admin.post("/v1/admin/versions/v2/retire")
    assert response.status_code == 200 and response.json()["status"] == "retired"
