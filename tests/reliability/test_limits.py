"""Input limits, each refused the documented way over real HTTP (and in-process where the layer
is part of the app): bodies too large or too slow, headers too slow, idle kept-alive
connections, and event fields outside the contract."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from encoder_service.api.app import create_app
from encoder_service.api.problems import PROBLEM_JSON, TYPE_PREFIX
from encoder_service.settings import Settings
from tests.api.conftest import Catalog, api_client, bearer, make_settings
from tests.refresher.conftest import repo_root
from tests.reliability.conftest import read_until_closed, serve

MAX_BODY = 4096
TIMEOUT_S = 0.5


@pytest.fixture
def limited(redis_url: str, catalog: Catalog) -> Settings:
    return make_settings(
        redis_url,
        api_max_body_bytes=MAX_BODY,
        api_body_timeout_seconds=TIMEOUT_S,
        api_header_timeout_seconds=TIMEOUT_S,
        api_keep_alive_seconds=1,
    )


@pytest.fixture
def server(limited: Settings) -> Iterator[int]:
    with serve(limited) as (_, port):
        yield port


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _problem_type(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert PROBLEM_JSON.encode() in head.lower(), head
    return orjson.loads(body)["type"].removeprefix(TYPE_PREFIX)


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server: int) -> None:
    """Only the headers go out: the 413 arrives without the server waiting for a byte of body."""
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/embeddings:batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {bearer('read')['Authorization'][7:]}\r\n".encode()
            + b"Content-Length: 50000000\r\n\r\n"
        )
        started = time.monotonic()
        response = read_until_closed(sock, timeout=5)
    assert _status(response) == 413 and _problem_type(response) == "body-too-large"
    assert time.monotonic() - started < TIMEOUT_S, "the server waited for the body"


async def test_a_chunked_body_is_cut_off_at_the_limit_in_process(limited: Settings) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"user_ids": ['
        for _ in range(10_000):
            yield b'"u1",'
        yield b'"u2"]}'

    async with api_client(create_app(limited), "asgi", bearer("read")) as client:
        response = await client.post("/v1/embeddings:batch", content=chunks())
        assert response.status_code == 413
        assert response.headers["content-type"] == PROBLEM_JSON
        assert response.json()["type"] == TYPE_PREFIX + "body-too-large"
        assert response.json()["limit"] == MAX_BODY
        # A body under the limit is read and answered normally.
        ok = await client.post("/v1/embeddings:batch", json={"user_ids": ["u1"] * 40})
    assert ok.status_code == 200 and len(ok.json()["embeddings"]) == 40


def test_a_chunked_body_is_cut_off_at_the_limit_over_http(server: int) -> None:
    """No length declared: the server counts what arrives and answers once past the limit,
    without waiting for the rest (the client here never sends the final chunk)."""
    chunk = b'"u1",' * 200
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/embeddings:batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {bearer('read')['Authorization'][7:]}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(MAX_BODY // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = read_until_closed(sock, timeout=5)
    assert _status(response) == 413 and _problem_type(response) == "body-too-large"


def test_a_body_trickling_in_is_answered_408(server: int) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/embeddings:batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {bearer('read')['Authorization'][7:]}\r\n".encode()
            + b"Content-Length: 100\r\n\r\n"
            + b'{"user_ids": '
        )
        started = time.monotonic()
        response = read_until_closed(sock, timeout=5)
    assert _status(response) == 408 and _problem_type(response) == "request-timeout"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 2


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/users/u1/embedding HTTP/1.1\r\nHost: t\r\nAuthor"],
    ids=["silent", "slow-headers"],
)
def test_a_client_slow_to_send_its_headers_is_disconnected(server: int, sent: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        response = read_until_closed(sock, timeout=5)
        elapsed = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408"), response
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 2


def test_headers_sent_in_time_are_served_and_an_idle_connection_is_closed(server: int) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        rest = read_until_closed(sock, timeout=5)  # keep-alive of 1 s, then closed
        elapsed = time.monotonic() - started
    assert rest == b"" and 0.8 <= elapsed < 3


EVENT = {"user_id": "u1", "item_id": "i1", "timestamp": 1_718_000_000.0}


@pytest.mark.parametrize("transport", ["asgi", "http"])
@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"user_id": "u" * 129}, "user_id", "not a valid id"),
        ({"user_id": "a b"}, "user_id", "not a valid id"),
        ({"timestamp": time.time() + 3 * 86_400}, "timestamp", "past the latest accepted"),
        ({"timestamp": -1}, "timestamp", "outside the accepted window"),
        ({"weight": "inf"}, "weight", "outside 0"),
        ({"weight": 1e9}, "weight", "outside 0"),
        ({"context": "x" * 129}, "context", "longer than 128"),
        ({"categories": [f"c{i}" for i in range(65)]}, "categories", "more than 64"),
        ({"profile": {f"f{i}": i for i in range(65)}}, "profile", "more than 64 fields"),
    ],
)
async def test_events_outside_the_contract_are_refused_by_field(
    limited: Settings, transport: str, change: dict, field: str, reason: str
) -> None:
    events = [EVENT, {**EVENT, **change}]
    async with api_client(create_app(limited), transport, bearer("ingest")) as client:
        response = await client.post("/v1/events", json={"events": events})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 1
    (refused,) = body["refused"]
    assert refused["index"] == 1 and refused["field"] == field and reason in refused["reason"]


@pytest.mark.parametrize("transport", ["asgi", "http"])
async def test_an_overlong_user_id_in_a_path_is_a_422(limited: Settings, transport: str) -> None:
    async with api_client(create_app(limited), transport, bearer("read")) as client:
        response = await client.get(f"/v1/users/{'u' * 129}/embedding")
    assert response.status_code == 422
    assert response.json()["type"] == TYPE_PREFIX + "invalid-request"


def test_the_default_body_limit_fits_every_valid_full_batch() -> None:
    """The shipped defaults allow every valid request: a full batch of the longest ids and a
    full batch of the largest events fit in the body limit."""
    settings = Settings()
    ids = {"user_ids": ["u" * 128] * settings.batch_limit}
    event = {
        **EVENT,
        "user_id": "u" * 128,
        "item_id": "i" * 128,
        "context": "c" * 128,
        "event_type": "t" * 128,
        "idempotency_key": "k" * 128,
    }
    assert len(orjson.dumps(ids)) < settings.api_max_body_bytes
    assert len(orjson.dumps({"events": [event] * settings.batch_limit})) < (
        settings.api_max_body_bytes
    )


@pytest.mark.slow
def test_the_served_command_with_several_workers_keeps_the_deadlines(
    redis_url: str, catalog: Catalog, tmp_path: Path
) -> None:
    """``encoder-service serve --workers 2``: worker processes take the protocol by import
    path and their settings from the environment, so the deadline must reach them that way."""
    port = _free_port()
    env = {
        **os.environ,
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_AUTH_MODE": "none",
        "ENCODER_API_HEADER_TIMEOUT_SECONDS": str(TIMEOUT_S),
        "ENCODER_API_MAX_BODY_BYTES": str(MAX_BODY),
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "encoder_service.cli", "serve", "--port", str(port)]
            + ["--workers", "2"],
            cwd=repo_root(),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with _connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            started = time.monotonic()
            response = read_until_closed(sock, timeout=5)
        assert response.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3
        big = httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings:batch",
            json={"user_ids": ["u1"] * 1000},
            timeout=10,
        )
        assert big.status_code == 413 and big.json()["type"] == TYPE_PREFIX + "body-too-large"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
