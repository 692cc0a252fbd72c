"""Reading embeddings: values equal to what is stored, binary forms, batches, the version cache."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import redis

from encoder_service.api.app import create_app
from encoder_service.api.responses import negotiate
from encoder_service.registry import Registry
from encoder_service.settings import Settings
from tests.api.conftest import BATCH_LIMIT, DIM, UPDATED_AT, Catalog, api_client, bearer


def as_float32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


async def test_json_defaults_to_the_active_version(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    response = await client.get("/v1/users/u3/embedding")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body.keys() == {"user_id", "version", "dim", "embedding", "updated_at"}
    assert (body["user_id"], body["version"], body["dim"]) == ("u3", "v1", DIM)
    assert body["updated_at"] == UPDATED_AT
    np.testing.assert_array_equal(as_float32(body["embedding"]), catalog.vectors["v1"]["u3"])


@pytest.mark.parametrize("user_id", ["alice@example.org", "b:42", "c.d-e_f"])
async def test_ids_with_punctuation(
    client: httpx.AsyncClient, catalog: Catalog, user_id: str
) -> None:
    response = await client.get(f"/v1/users/{user_id}/embedding")
    assert response.status_code == 200
    vector = as_float32(response.json()["embedding"])
    np.testing.assert_array_equal(vector, catalog.vectors["v1"][user_id])


async def test_pinned_float16_version_serves_its_stored_values(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    response = await client.get("/v1/users/u4/embedding", params={"version": "v2"})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == "v2"
    stored = catalog.vectors["v2"]["u4"]
    np.testing.assert_array_equal(as_float32(body["embedding"]), stored)
    assert not np.array_equal(stored, catalog.vectors["v1"]["u4"])


async def test_octet_stream_is_the_raw_float32_vector(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    response = await client.get(
        "/v1/users/u5/embedding", headers={"Accept": "application/octet-stream"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-embedding-version"] == "v1"
    assert response.headers["x-embedding-dim"] == str(DIM)
    assert float(response.headers["x-embedding-updated-at"]) == UPDATED_AT
    assert len(response.content) == DIM * 4
    vector = np.frombuffer(response.content, dtype="<f4")
    np.testing.assert_array_equal(vector, catalog.vectors["v1"]["u5"])


async def test_npy_loads_with_numpy(client: httpx.AsyncClient, catalog: Catalog) -> None:
    response = await client.get(
        "/v1/users/u6/embedding", params={"version": "v2"}, headers={"Accept": "application/x-npy"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-npy"
    assert response.headers["x-embedding-version"] == "v2"
    assert response.headers["x-embedding-dim"] == str(DIM)
    vector = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert vector.dtype == np.dtype("<f4")
    assert vector.shape == (DIM,)
    np.testing.assert_array_equal(vector, catalog.vectors["v2"]["u6"])


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("application/x-npy", "application/x-npy"),
        ("application/octet-stream, application/json;q=0.5", "application/octet-stream"),
        ("application/json;q=0.2, application/x-npy;q=0.9", "application/x-npy"),
        ("application/*", "application/json"),
        ("application/*;q=0.1, application/octet-stream", "application/octet-stream"),
        ("application/json;q=0, */*", "application/octet-stream"),
        ("text/html", "application/json"),
        ("APPLICATION/X-NPY; q=1", "application/x-npy"),
        ("application/x-npy;q=oops", "application/json"),
    ],
)
def test_accept_negotiation(accept: str, expected: str) -> None:
    assert negotiate(accept) == expected


async def test_batch_keeps_request_order_and_lists_missing(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    ids = ["u9", "nobody", "u1", "alice@example.org", "ghost", "u9"]
    response = await client.post("/v1/embeddings:batch", json={"user_ids": ids})
    assert response.status_code == 200
    body = response.json()
    assert (body["version"], body["dim"]) == ("v1", DIM)
    assert [e["user_id"] for e in body["embeddings"]] == ["u9", "u1", "alice@example.org", "u9"]
    assert body["missing"] == ["nobody", "ghost"]
    for entry in body["embeddings"]:
        assert entry.keys() == {"user_id", "embedding"}  # updated_at only when asked
        expected = catalog.vectors["v1"][entry["user_id"]]
        np.testing.assert_array_equal(as_float32(entry["embedding"]), expected)


async def test_batch_of_a_pinned_version(client: httpx.AsyncClient, catalog: Catalog) -> None:
    ids = catalog.users("v2")[::-1] + ["u19"]  # u19 has a v1 embedding but none under v2
    response = await client.post("/v1/embeddings:batch", json={"user_ids": ids, "version": "v2"})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == "v2"
    assert body["missing"] == ["u19"]
    matrix = np.array([e["embedding"] for e in body["embeddings"]], dtype=np.float32)
    np.testing.assert_array_equal(matrix, np.stack([catalog.vectors["v2"][u] for u in ids[:-1]]))


async def test_empty_and_full_batches(client: httpx.AsyncClient) -> None:
    empty = await client.post("/v1/embeddings:batch", json={"user_ids": []})
    assert empty.status_code == 200
    assert empty.json() == {"version": "v1", "dim": DIM, "embeddings": [], "missing": []}
    full = await client.post(
        "/v1/embeddings:batch", json={"user_ids": [f"u{i}" for i in range(BATCH_LIMIT)]}
    )
    assert full.status_code == 200
    assert len(full.json()["embeddings"]) == 20
    assert len(full.json()["missing"]) == BATCH_LIMIT - 20


async def test_reads_are_counted_in_metrics(client: httpx.AsyncClient) -> None:
    def served(text: str) -> float:
        prefix = 'encoder_api_embeddings_served_total{consumer="read-client",version="v2"} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0

    before = served((await client.get("/metrics")).text)
    await client.get("/v1/users/u1/embedding", params={"version": "v2"})
    await client.post(
        "/v1/embeddings:batch", json={"user_ids": ["u2", "u3", "zz"], "version": "v2"}
    )
    text = (await client.get("/metrics")).text
    assert served(text) == before + 3
    assert 'encoder_api_missing_users_total{version="v2"}' in text
    assert (
        'encoder_api_request_duration_seconds_count{method="GET",'
        'route="/v1/users/{user_id}/embedding",status="200",version="v2"}'
    ) in text


async def test_a_promotion_shows_after_the_cache_ttl(
    redis_url: str, redis_client: redis.Redis, catalog: Catalog
) -> None:
    settings = Settings(redis_url=redis_url, auth_mode="none", api_version_cache_ttl=0.3)  # type: ignore[call-arg]
    async with api_client(create_app(settings), "asgi") as client:
        assert (await client.get("/v1/users/u1/embedding")).json()["version"] == "v1"
        Registry(redis_client).promote("v2", by="tests")
        # Within the TTL the process still serves its cached active version ...
        assert (await client.get("/v1/users/u1/embedding")).json()["version"] == "v1"
        await asyncio.sleep(0.35)
        # ... and after it, the new one, without a restart.
        assert (await client.get("/v1/users/u1/embedding")).json()["version"] == "v2"


async def test_concurrent_reads(client: httpx.AsyncClient, catalog: Catalog) -> None:
    users = catalog.users("v1")
    responses = await asyncio.gather(*(client.get(f"/v1/users/{u}/embedding") for u in users))
    for user, response in zip(users, responses, strict=True):
        assert response.status_code == 200
        vector = as_float32(response.json()["embedding"])
        np.testing.assert_array_equal(vector, catalog.vectors["v1"][user])


async def test_health_endpoints_need_no_key(settings: Settings, catalog: Catalog) -> None:
    async with api_client(create_app(settings), "asgi") as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/readyz")).status_code == 200
        assert (await anonymous.get("/metrics")).status_code == 200
        assert (await anonymous.get("/v1/users/u1/embedding")).status_code == 401
        keyed = await anonymous.get("/v1/users/u1/embedding", headers=bearer("read"))
        assert keyed.status_code == 200
