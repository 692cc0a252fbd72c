"""The read side of the version registry: the list, the active pointer, single manifests."""

from __future__ import annotations

import httpx
import redis

from tests.api.conftest import DIM

PROBLEM = "application/problem+json"


async def test_list_names_the_active_version_oldest_first(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/versions")
    assert response.status_code == 200
    body = response.json()
    assert body["active"] == "v1"
    assert [m["version"] for m in body["versions"]] == ["v0", "v1", "v2"]
    assert [m["status"] for m in body["versions"]] == ["retired", "active", "shadow"]


async def test_manifest_carries_dim_schema_status_and_metrics(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/versions/v2")
    assert response.status_code == 200
    manifest = response.json()
    assert manifest["version"] == "v2"
    assert manifest["embedding_dim"] == DIM
    assert manifest["dtype"] == "float16"
    assert manifest["schema_hash"] == "schema-v2"
    assert manifest["status"] == "shadow"
    assert manifest["created_at"] == "2024-06-03T00:00:00+00:00"
    assert manifest["metrics"] == {"reconstruction_loss": 0.30000000000000004}
    assert [change["status"] for change in manifest["status_history"]] == ["shadow"]
    assert manifest["parent_version"] is None  # fields beyond the documented ones pass through


async def test_retired_manifest_stays_readable(client: httpx.AsyncClient) -> None:
    manifest = (await client.get("/v1/versions/v0")).json()
    assert manifest["status"] == "retired"
    history = [change["status"] for change in manifest["status_history"]]
    assert history == ["shadow", "active", "deprecated", "retired"]
    assert all(change["by"] == "tests" for change in manifest["status_history"])


async def test_unknown_version_is_a_404_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/versions/v9")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:encoder-service:problem:unknown-version"
    assert problem["version"] == "v9"
    assert problem["instance"] == "/v1/versions/v9"


async def test_malformed_version_is_a_422_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/versions/-v1")
    assert response.status_code == 422
    assert response.json()["type"] == "urn:encoder-service:problem:invalid-request"
    assert response.json()["errors"][0]["loc"] == ["path", "version"]


async def test_empty_registry(client: httpx.AsyncClient, redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    assert (await client.get("/v1/versions")).json() == {"active": None, "versions": []}
