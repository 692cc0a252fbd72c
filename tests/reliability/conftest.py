"""Reliability fixtures: the API served by uvicorn with the production server options (timeouts
and header deadline included), raw sockets for clients that misbehave, and the refresher
fixtures (a tiny trained model published as several versions)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from encoder_service.api.app import create_app
from encoder_service.api.server import server_options
from encoder_service.settings import Settings
from tests.api.conftest import catalog  # noqa: F401 - fixture
from tests.refresher.conftest import encoders, make_refresher, trained  # noqa: F401 - fixtures


@contextmanager
def serve(settings: Settings) -> Iterator[tuple[str, int]]:
    """The app of ``settings`` under uvicorn, configured as ``encoder-service serve`` does, on a
    free port in a thread; yields ``(base_url, port)``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_level="warning", **server_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data
