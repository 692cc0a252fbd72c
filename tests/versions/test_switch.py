"""Two versions live, readers pinned to each, and atomic promote/rollback under a reader loop,
over real HTTP against a real Valkey."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import redis

from encoder_service.api.app import create_app
from encoder_service.registry import Registry
from tests.api.conftest import api_client, bearer, make_settings, publish

USERS = [f"u{i}" for i in range(30)]


def _f32(values: object) -> np.ndarray:
    """JSON carries each float32 as its shortest decimal; back to float32 it is exact."""
    return np.asarray(values, dtype=np.float32)


async def test_readers_pinned_to_each_live_version_get_their_own_vectors(
    redis_client: redis.Redis, redis_url: str
) -> None:
    vectors = {
        "a": publish(redis_client, "a", USERS, seed=0, promote=True),
        "b": publish(redis_client, "b", USERS, seed=1),
    }
    async with api_client(create_app(make_settings(redis_url)), "http", bearer("read")) as client:
        for version in ("a", "b"):
            for user in USERS[:5]:
                body = (await client.get(f"/v1/users/{user}/embedding?version={version}")).json()
                assert body["version"] == version
                np.testing.assert_array_equal(_f32(body["embedding"]), vectors[version][user])
            batch = await client.post(
                "/v1/embeddings:batch", json={"user_ids": USERS, "version": version}
            )
            got = [e["embedding"] for e in batch.json()["embeddings"]]
            np.testing.assert_array_equal(_f32(got), [vectors[version][u] for u in USERS])
    assert not np.allclose(vectors["a"]["u0"], vectors["b"]["u0"])


async def test_promote_and_rollback_are_atomic_for_a_reader_loop(
    redis_client: redis.Redis, redis_url: str
) -> None:
    vectors = {
        "a": publish(redis_client, "a", USERS, seed=0, promote=True),
        "b": publish(redis_client, "b", USERS, seed=1),
    }
    registry = Registry(redis_client)
    stop = threading.Event()
    switches = 0

    def switcher() -> None:
        nonlocal switches
        registry.promote("b", by="switcher")
        while not stop.is_set():
            registry.rollback(by="switcher")
            switches += 1

    # No version cache: every request resolves the active version against Redis right now.
    app = create_app(make_settings(redis_url, api_version_cache_ttl=0))
    seen: dict[str, int] = {"a": 0, "b": 0}
    thread = threading.Thread(target=switcher)
    async with api_client(app, "http", bearer("read")) as client:
        thread.start()
        try:
            for i in range(300):
                user = USERS[i % len(USERS)]
                single, batch = await asyncio.gather(
                    client.get(f"/v1/users/{user}/embedding"),
                    client.post("/v1/embeddings:batch", json={"user_ids": USERS}),
                )
                body = single.json()
                seen[body["version"]] += 1
                expected_one = vectors[body["version"]][user]
                np.testing.assert_array_equal(_f32(body["embedding"]), expected_one)
                whole = batch.json()
                got = _f32([e["embedding"] for e in whole["embeddings"]])
                expected = np.array([vectors[whole["version"]][u] for u in USERS])
                np.testing.assert_array_equal(got, expected)  # one version for the whole batch
        finally:
            stop.set()
            thread.join()
    assert switches > 10
    assert seen["a"] > 0 and seen["b"] > 0
    statuses = {m["version"]: m["status"] for m in registry.list()}
    assert sorted(statuses.values()) == ["active", "deprecated"]
