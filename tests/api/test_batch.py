"""The batch endpoint's binary forms, optional update times and ``as=`` alignment, against a
real Valkey, in-process and over real HTTP."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import redis

from encoder_service.alignment import align_versions
from encoder_service.api.app import create_app
from encoder_service.registry import Registry
from encoder_service.settings import Settings
from encoder_service.store import EmbeddingStore, encode_meta, meta_key
from tests.api.conftest import (
    BATCH_LIMIT,
    DIM,
    TRANSPORTS,
    UPDATED_AT,
    Catalog,
    api_client,
    bearer,
    publish,
)

BATCH = "/v1/embeddings:batch"
OCTET = {"Accept": "application/octet-stream"}
NPY = {"Accept": "application/x-npy"}
IDS = ["u9", "nobody", "u1", "alice@example.org", "ghost", "u9"]


def expected_matrix(vectors: dict[str, np.ndarray], ids: list[str], dim: int = DIM) -> np.ndarray:
    """What a binary batch must hold: stored vectors in request order, NaN rows elsewhere."""
    return np.stack([vectors.get(u, np.full(dim, np.nan, np.float32)) for u in ids])


def assert_batch_headers(
    response: httpx.Response, *, version: str, rows: int, missing: int, dim: int = DIM
) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["x-embedding-version"] == version
    assert response.headers["x-embedding-dim"] == str(dim)
    assert response.headers["x-embedding-count"] == str(rows)
    assert response.headers["x-embedding-missing"] == str(missing)


async def test_octet_stream_is_one_matrix_in_request_order(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    response = await client.post(BATCH, json={"user_ids": IDS}, headers=OCTET)
    assert_batch_headers(response, version="v1", rows=len(IDS), missing=2)
    assert response.headers["content-type"] == "application/octet-stream"
    assert len(response.content) == len(IDS) * DIM * 4
    matrix = np.frombuffer(response.content, "<f4").reshape(len(IDS), DIM)
    np.testing.assert_array_equal(matrix, expected_matrix(catalog.vectors["v1"], IDS))
    # The NaN rows are exactly the missing ids: stored vectors are never NaN.
    assert np.isnan(matrix).all(axis=1).tolist() == [False, True, False, False, True, False]
    assert not np.isnan(matrix[[0, 2, 3, 5]]).any()


async def test_npy_batch_loads_with_numpy_for_a_float16_version(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    ids = catalog.users("v2")[::-1] + ["u19"]  # u19 has a v1 embedding but none under v2
    response = await client.post(BATCH, json={"user_ids": ids, "version": "v2"}, headers=NPY)
    assert_batch_headers(response, version="v2", rows=len(ids), missing=1)
    assert response.headers["content-type"] == "application/x-npy"
    matrix = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert matrix.dtype == np.dtype("<f4") and matrix.shape == (len(ids), DIM)
    np.testing.assert_array_equal(matrix, expected_matrix(catalog.vectors["v2"], ids))


async def test_binary_and_json_batches_carry_the_same_values(
    client: httpx.AsyncClient, catalog: Catalog
) -> None:
    ids = catalog.users("v1")
    as_json = (await client.post(BATCH, json={"user_ids": ids})).json()
    binary = await client.post(BATCH, json={"user_ids": ids}, headers=OCTET)
    from_json = np.asarray([e["embedding"] for e in as_json["embeddings"]], np.float32)
    np.testing.assert_array_equal(from_json, np.frombuffer(binary.content, "<f4").reshape(-1, DIM))


async def test_updated_at_only_when_asked(
    client: httpx.AsyncClient, catalog: Catalog, redis_client: redis.Redis
) -> None:
    refreshed_at = UPDATED_AT + 1234.25  # the refresher re-encoded u1 after the publish
    redis_client.set(meta_key("u1"), encode_meta(refreshed_at, {"events:{0}": "1-0"}))
    plain = (await client.post(BATCH, json={"user_ids": IDS})).json()
    assert all("updated_at" not in e for e in plain["embeddings"])

    asked = await client.post(BATCH, params={"updated_at": "true"}, json={"user_ids": IDS})
    assert asked.status_code == 200
    times = {e["user_id"]: e["updated_at"] for e in asked.json()["embeddings"]}
    assert times == {"u9": UPDATED_AT, "u1": refreshed_at, "alice@example.org": UPDATED_AT}

    binary = await client.post(
        BATCH, params={"updated_at": "true"}, json={"user_ids": IDS}, headers=OCTET
    )
    assert_batch_headers(binary, version="v1", rows=len(IDS), missing=2)
    split = len(IDS) * DIM * 4
    assert len(binary.content) == split + len(IDS) * 8
    matrix = np.frombuffer(binary.content[:split], "<f4").reshape(len(IDS), DIM)
    np.testing.assert_array_equal(matrix, expected_matrix(catalog.vectors["v1"], IDS))
    stamps = np.frombuffer(binary.content[split:], "<f8")
    expected = [UPDATED_AT, np.nan, refreshed_at, UPDATED_AT, np.nan, UPDATED_AT]
    np.testing.assert_array_equal(stamps, expected)


async def test_npy_with_updated_at_is_refused_naming_the_parameter(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        BATCH, params={"updated_at": "true"}, json={"user_ids": ["u1"]}, headers=NPY
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:encoder-service:problem:invalid-request"
    assert problem["errors"][0]["loc"] == ["query", "updated_at"]


async def test_empty_and_full_binary_batches(client: httpx.AsyncClient, catalog: Catalog) -> None:
    empty = await client.post(BATCH, json={"user_ids": []}, headers=OCTET)
    assert_batch_headers(empty, version="v1", rows=0, missing=0)
    assert empty.content == b""
    ids = [f"u{i}" for i in range(BATCH_LIMIT)]
    full = await client.post(BATCH, json={"user_ids": ids}, headers=OCTET)
    assert_batch_headers(full, version="v1", rows=BATCH_LIMIT, missing=BATCH_LIMIT - 20)
    matrix = np.frombuffer(full.content, "<f4").reshape(BATCH_LIMIT, DIM)
    np.testing.assert_array_equal(matrix, expected_matrix(catalog.vectors["v1"], ids))
    too_many = await client.post(BATCH, json={"user_ids": ids + ["u0"]}, headers=OCTET)
    assert too_many.status_code == 413
    assert too_many.json()["type"] == "urn:encoder-service:problem:batch-too-large"


async def test_binary_batches_are_counted_like_json_ones(client: httpx.AsyncClient) -> None:
    def served(text: str) -> float:
        prefix = 'encoder_api_embeddings_served_total{consumer="read-client",version="v2"} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0

    before = served((await client.get("/metrics")).text)
    body = {"user_ids": ["u2", "u3", "zz"], "version": "v2"}
    assert (await client.post(BATCH, json=body, headers=OCTET)).status_code == 200
    assert served((await client.get("/metrics")).text) == before + 2


def _rotated(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``a`` random and ``b`` = a rotated, scaled and shifted: a map from B to A exists."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((n, DIM)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    b = (2 * a @ rotation + 0.5).astype(np.float32)
    return a, b


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_batch_reads_a_retired_version_through_the_alignment_map(
    redis_client: redis.Redis, settings: Settings, transport: str
) -> None:
    users = [f"u{i}" for i in range(200)]
    a, b = _rotated(len(users))
    publish(redis_client, "A", users, promote=True)
    publish(redis_client, "B", users, seed=1)
    store = EmbeddingStore(redis_client)
    store.write_embeddings("A", users, a)
    store.write_embeddings("B", users, b)
    mapping = align_versions(redis_client, "B", "A", "procrustes")
    registry = Registry(redis_client)
    registry.promote("B", by="ops")
    registry.retire("A", by="ops")
    ids = ["u7", "nobody", "u150", "u7"]
    rows = [7, 150, 7]

    async with api_client(create_app(settings), transport, bearer("read")) as client:
        retired = await client.post(BATCH, json={"user_ids": ids, "version": "A"})
        assert retired.status_code == 410
        answer = await client.post(
            BATCH, params={"as": "A", "updated_at": "true"}, json={"user_ids": ids, "version": "B"}
        )
        assert answer.status_code == 200
        body = answer.json()
        assert (body["version"], body["aligned_from"], body["dim"]) == ("A", "B", DIM)
        assert body["missing"] == ["nobody"]
        assert [e["user_id"] for e in body["embeddings"]] == ["u7", "u150", "u7"]
        assert all(e["updated_at"] == UPDATED_AT for e in body["embeddings"])
        got = np.asarray([e["embedding"] for e in body["embeddings"]], np.float32)
        # The served rows are the stored map applied to B, and close to true A.
        np.testing.assert_array_equal(got, mapping.apply(b[rows]))
        np.testing.assert_allclose(got, a[rows], atol=1e-3)

        binary = await client.post(
            BATCH, params={"as": "A"}, json={"user_ids": ids, "version": "B"}, headers=OCTET
        )
        assert_batch_headers(binary, version="A", rows=len(ids), missing=1)
        assert binary.headers["x-embedding-aligned-from"] == "B"
        matrix = np.frombuffer(binary.content, "<f4").reshape(len(ids), DIM)
        np.testing.assert_array_equal(matrix[[0, 2, 3]], got)
        assert np.isnan(matrix[1]).all()

        no_map = await client.post(BATCH, params={"as": "C"}, json={"user_ids": ids})
        assert no_map.status_code == 404
        assert no_map.json()["type"] == "urn:encoder-service:problem:unknown-version"
        assert "versions align B C" in no_map.json()["detail"]
