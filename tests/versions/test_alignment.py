"""Alignment maps: the fits recover a known map, and `?version=B&as=A` serves A's space once A
is retired, over real HTTP on a real Valkey."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from encoder_service.alignment import AlignmentError, AlignmentMap, align_versions, fit
from encoder_service.api.app import create_app
from encoder_service.registry import Registry
from encoder_service.store import EmbeddingStore
from tests.api.conftest import DIM, api_client, bearer, make_settings, publish


def _rotated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``a`` random, ``b`` = a rotated, scaled by 2 and shifted, plus a little noise."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, DIM)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    b = (2 * a @ rotation + 0.5 + 0.01 * rng.standard_normal((n, DIM))).astype(np.float32)
    return a, b, rotation


@pytest.mark.parametrize("kind", ["procrustes", "ridge"])
def test_a_fit_recovers_a_rotation_and_round_trips_through_fields(kind: str) -> None:
    a, b, _ = _rotated(400)
    mapping = fit(b, a, kind, source_version="B", target_version="A")  # type: ignore[arg-type]
    assert mapping.metrics["holdout_r2"] > 0.999
    assert mapping.metrics["holdout_cosine"] > 0.999
    np.testing.assert_allclose(mapping.apply(b), a, atol=0.05)
    again = AlignmentMap.from_fields(mapping.to_fields())
    np.testing.assert_array_equal(again.apply(b[:3]), mapping.apply(b[:3]))
    assert (again.source, again.target, again.kind) == ("B", "A", kind)


def test_fits_refuse_what_cannot_be_fitted() -> None:
    a, b, _ = _rotated(20)
    with pytest.raises(AlignmentError, match="too few"):
        fit(b, a, "ridge")
    with pytest.raises(AlignmentError, match="unknown alignment kind"):
        fit(b, a, "magic")  # type: ignore[arg-type]


async def test_a_reader_of_a_retired_version_reads_it_from_the_new_one(
    redis_client: redis.Redis, redis_url: str
) -> None:
    users = [f"u{i}" for i in range(300)]
    a, b, _ = _rotated(len(users))
    store = EmbeddingStore(redis_client)
    publish(redis_client, "A", users, promote=True)
    publish(redis_client, "B", users, seed=1)
    store.write_embeddings("A", users, a)
    store.write_embeddings("B", users, b)
    mapping = align_versions(redis_client, "B", "A", "procrustes")
    assert mapping.metrics["users"] == len(users)
    registry = Registry(redis_client)
    registry.promote("B", by="ops")
    registry.retire("A", by="ops")

    async with api_client(create_app(make_settings(redis_url)), "http", bearer("read")) as client:
        assert (await client.get("/v1/users/u7/embedding?version=A")).status_code == 410
        response = await client.get("/v1/users/u7/embedding?version=B&as=A")
        assert response.status_code == 200
        body = response.json()
        assert (body["version"], body["aligned_from"], body["dim"]) == ("A", "B", DIM)
        np.testing.assert_allclose(body["embedding"], a[7], atol=0.05)
        binary = await client.get(
            "/v1/users/u7/embedding?version=B&as=A",
            headers={"Accept": "application/octet-stream"},
        )
        assert binary.headers["X-Embedding-Version"] == "A"
        assert binary.headers["X-Embedding-Aligned-From"] == "B"
        vector = np.frombuffer(binary.content, "<f4")
        np.testing.assert_array_equal(vector, np.asarray(body["embedding"], np.float32))
        missing = await client.get("/v1/users/u7/embedding?version=A&as=B")
        assert missing.status_code == 410  # A itself is retired: nothing to read from
        none = await client.get("/v1/users/u7/embedding?version=B&as=C")
        assert none.status_code == 404
        assert "versions align B C" in none.json()["detail"]
