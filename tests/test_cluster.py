"""The cross-slot rules on a real 3-master Redis Cluster: a batch of users spread over all 16384
slots is read back whole and in request order, through the store and through the API over HTTP,
and SCAN-based work reaches every master.

These tests always run against the local cluster (started once per session), whether or not the
rest of the suite was pointed at it with ``--redis-cluster``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from encoder_service import cluster
from encoder_service.api.app import create_app
from encoder_service.local_cluster import SLOTS, LocalCluster, local_cluster
from encoder_service.redis_connection import async_client, is_cluster_deployment, sync_client
from encoder_service.settings import get_settings
from encoder_service.store import AsyncEmbeddingStore, EmbeddingStore, decode_rows, state_key
from tests.api.conftest import DIM, api_client, bearer, make_settings, publish

MASTERS = 3


def users_on_every_slot() -> list[str]:
    """One user id per cluster slot (the first ``u<i>`` found hashing there), in slot order."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < SLOTS:
        user = f"u{i}"
        found.setdefault(cluster.slot_of(state_key(user)), user)
        i += 1
    return [found[slot] for slot in range(SLOTS)]


@pytest.fixture(scope="module")
def every_slot() -> list[str]:
    return users_on_every_slot()


@pytest.fixture
def cluster_client(local_redis_cluster: LocalCluster) -> Iterator[redis.Redis]:
    """A client of the local cluster (chosen by asking the server), flushed on every master."""
    with sync_client(local_redis_cluster.url) as client:
        client.flushdb()
        yield client


def _masters_holding(client: redis.Redis) -> int:
    """How many primaries hold at least one key."""
    primaries = client.get_primaries()  # type: ignore[attr-defined]
    return sum(1 for node in primaries if client.dbsize(target_nodes=node))  # type: ignore[call-arg]


def test_the_cluster_has_three_masters_sharing_every_slot(
    local_redis_cluster: LocalCluster, cluster_client: redis.Redis, valkey_server_factory
) -> None:
    assert isinstance(cluster_client, redis.cluster.RedisCluster)
    ranges = cluster_client.execute_command("CLUSTER SLOTS")  # {(first, last): {"primary": ..}}
    covered = sorted((first, last, node["primary"][1]) for (first, last), node in ranges.items())
    assert len({port for *_, port in covered}) == MASTERS
    assert sum(last - first + 1 for first, last, _ in covered) == SLOTS
    assert is_cluster_deployment(local_redis_cluster.url)
    single = valkey_server_factory(persistent=False)
    assert not is_cluster_deployment(single.connection_url)
    with sync_client(single.connection_url) as plain:
        assert not cluster.is_cluster(plain)


def test_a_batch_over_every_slot_is_read_whole_and_in_request_order(
    cluster_client: redis.Redis, every_slot: list[str]
) -> None:
    store = EmbeddingStore(cluster_client)
    matrix = np.random.default_rng(0).standard_normal((len(every_slot), DIM)).astype(np.float32)
    assert store.write_embeddings("v1", every_slot, matrix) == SLOTS
    assert _masters_holding(cluster_client) == MASTERS

    order = np.random.default_rng(1).permutation(len(every_slot))
    asked = [every_slot[i] for i in order]
    asked.insert(7, "nobody")  # a missing id keeps its place
    raws = store.read_embeddings("v1", asked)
    found, mask = decode_rows(raws, DIM)
    assert not mask[7] and mask.sum() == SLOTS
    np.testing.assert_array_equal(found[mask], matrix[order])

    assert store.count_embeddings("v1") == SLOTS  # SCAN reaches every master
    assert store.delete_version("v1") == SLOTS
    assert _masters_holding(cluster_client) == 0


async def test_the_async_store_and_coalesced_reads_span_every_master(
    local_redis_cluster: LocalCluster, cluster_client: redis.Redis, every_slot: list[str]
) -> None:
    users = every_slot[:: SLOTS // 2000]  # 2,000 users, every ~8th slot: all three masters
    matrix = np.random.default_rng(2).standard_normal((len(users), DIM)).astype(np.float32)
    EmbeddingStore(cluster_client).write_embeddings("v1", users, matrix)
    client = async_client(local_redis_cluster.url)
    try:
        assert isinstance(client, redis.asyncio.cluster.RedisCluster)
        store = AsyncEmbeddingStore(client)
        reversed_users = users[::-1]
        raws, metas = await store.read_batch("v1", reversed_users, with_meta=True)
        found, mask = decode_rows(raws, DIM)
        assert mask.all() and metas == [None] * len(users)
        np.testing.assert_array_equal(found, matrix[::-1])
        # Concurrent single-user reads are gathered into one read spanning many slots.
        singles = await asyncio.gather(*(store.read_embedding("v1", u) for u in users[:300]))
        for row, (raw, meta) in enumerate(singles):
            assert meta is None
            np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), matrix[row])
    finally:
        await client.aclose()


async def test_the_api_serves_a_batch_spread_over_every_master_over_http(
    local_redis_cluster: LocalCluster, cluster_client: redis.Redis, every_slot: list[str]
) -> None:
    users = every_slot[:: SLOTS // 1000][:1000]
    vectors = publish(cluster_client, "v1", users, seed=1, promote=True)
    asked = users[::-1][:500] + ["nobody"] + users[::-1][500:999]
    settings = make_settings(local_redis_cluster.url, batch_limit=1000)
    async with api_client(create_app(settings), "http", bearer("read")) as client:
        reply = await client.post("/v1/embeddings:batch", json={"user_ids": asked})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert [e["user_id"] for e in body["embeddings"]] == [u for u in asked if u != "nobody"]
        assert body["missing"] == ["nobody"]
        for entry in body["embeddings"]:
            np.testing.assert_allclose(entry["embedding"], vectors[entry["user_id"]], rtol=1e-6)

        binary = await client.post(
            "/v1/embeddings:batch",
            json={"user_ids": asked},
            headers={"Accept": "application/octet-stream"},
        )
        assert binary.status_code == 200
        rows = np.frombuffer(binary.content, "<f4").reshape(len(asked), DIM)
        assert np.isnan(rows[500]).all()
        expected = np.stack([vectors[u] for u in asked if u != "nobody"])
        np.testing.assert_array_equal(np.delete(rows, 500, axis=0), expected)

        one = await asyncio.gather(
            *(client.get(f"/v1/users/{u}/embedding") for u in (users[0], users[500], users[-1]))
        )
        for u, r in zip((users[0], users[500], users[-1]), one, strict=True):
            assert r.status_code == 200
            np.testing.assert_allclose(r.json()["embedding"], vectors[u], rtol=1e-6)
        missing = await client.get("/v1/users/nobody/embedding")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("mode", ["true", "false"])
def test_the_setting_overrides_what_the_server_says(
    mode: str,
    local_redis_cluster: LocalCluster,
    valkey_server_factory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENCODER_REDIS_CLUSTER", mode)
    get_settings.cache_clear()
    try:
        assert is_cluster_deployment(local_redis_cluster.url) is (mode == "true")
        single = valkey_server_factory(persistent=False)
        assert is_cluster_deployment(single.connection_url) is (mode == "true")
    finally:
        monkeypatch.delenv("ENCODER_REDIS_CLUSTER")
        get_settings.cache_clear()


def test_a_guarded_write_lands_only_on_slots_left_unchanged(
    cluster_client: redis.Redis, every_slot: list[str]
) -> None:
    users = every_slot[:: SLOTS // 30]  # about ten users per master
    assert len({cluster.slot_of(state_key(u)) for u in users}) == len(users)
    cluster.mset(cluster_client, {state_key(u): b"old" for u in users})
    values = cluster.mget(cluster_client, [state_key(u) for u in users])
    read = dict(zip(users, values, strict=True))
    changed = set(users[::7])
    for user in changed:  # another writer commits these users after the read
        cluster_client.set(state_key(user), b"theirs")
    groups = [
        cluster.GuardedWrite(
            {state_key(u): read[u]}, {state_key(u): b"new", f"emb:v1:{{{u}}}": b"e"}, {}, 0
        )
        for u in users
    ]
    assert cluster.write_if_unchanged(cluster_client, groups) == [u not in changed for u in users]
    after = cluster.mget(cluster_client, [state_key(u) for u in users])
    assert after == [b"theirs" if u in changed else b"new" for u in users]
    embeddings = cluster.mget(cluster_client, [f"emb:v1:{{{u}}}" for u in users])
    assert embeddings == [None if u in changed else b"e" for u in users]
    # An absent key is guarded too: it must still be absent.
    fresh = cluster.GuardedWrite({state_key("nobody-yet"): None}, {state_key("nobody-yet"): b"x"})
    cluster_client.set(state_key("nobody-yet"), b"raced")
    assert cluster.write_if_unchanged(cluster_client, [fresh]) == [False]


def _move_slot(nodes: list[redis.Redis], slot: int, source: int, target: int) -> None:
    """Reshard ``slot`` from node ``source`` to node ``target``, keys included, the way
    ``valkey-cli --cluster reshard`` does."""
    ids = [n.execute_command("CLUSTER", "MYID") for n in nodes]
    nodes[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    nodes[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    keys = nodes[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    port = nodes[target].connection_pool.connection_kwargs["port"]
    nodes[source].execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
    for node in nodes:
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])


async def test_reads_and_writes_follow_a_slot_moved_under_a_client(tmp_path) -> None:
    with local_cluster(tmp_path, masters=MASTERS) as moving:
        users = [f"u{i}" for i in range(300)]
        keys = [state_key(u) for u in users]
        client = sync_client(moving.url)
        aclient = async_client(moving.url)
        nodes = [redis.Redis(host="127.0.0.1", port=n.port) for n in moving.nodes]
        try:
            cluster.mset(client, {k: k.encode() for k in keys})
            assert await cluster.mget_async(aclient, keys) == [k.encode() for k in keys]
            slot = cluster.slot_of(keys[0])
            source = next(i for i, n in enumerate(nodes) if n.cluster("COUNTKEYSINSLOT", slot))
            _move_slot(nodes, slot, source, (source + 1) % MASTERS)
            # Both clients still map the slot to its old node: the node answers MOVED, and
            # the read is redone through redis-py, which follows it.
            assert cluster.mget(client, keys) == [k.encode() for k in keys]
            assert await cluster.mget_async(aclient, keys) == [k.encode() for k in keys]
            cluster.mset(client, {keys[0]: b"after the move"})
            written = cluster.write_if_unchanged(
                client, [cluster.GuardedWrite({keys[0]: b"after the move"}, {keys[0]: b"cas"})]
            )
            assert written == [True]
            assert nodes[(source + 1) % MASTERS].get(keys[0]) == b"cas"
        finally:
            for node in nodes:
                node.close()
            client.close()
            await aclient.aclose()


async def test_the_api_answers_503_while_the_cluster_is_down(tmp_path) -> None:
    with local_cluster(tmp_path, masters=MASTERS) as down:
        with sync_client(down.url) as client:
            publish(client, "v1", ["u1", "u2"], seed=1, promote=True)
        app = create_app(make_settings(down.url))
        async with api_client(app, "asgi", bearer("read")) as api:
            assert (await api.get("/v1/users/u1/embedding")).status_code == 200
            for node in down.nodes:
                node.stop()
            for path in ("/v1/users/u2/embedding", "/readyz"):
                reply = await api.get(path)
                assert reply.status_code == 503, reply.text
                assert reply.json()["type"].endswith(":store-unavailable")
                assert "retry-after" in reply.headers
