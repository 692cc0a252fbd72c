"""A deadline on request headers, which uvicorn does not have.

uvicorn closes a kept-alive connection idle for ``timeout_keep_alive``, but a connection that
opens and sends nothing, or sends its headers a byte at a time (slowloris), it keeps forever:
enough of them exhaust the worker's file descriptors. This protocol (uvicorn's own, with one
timer added) gives each request ``api_header_timeout_seconds`` from the connection opening, or
from the first byte of a later request on a kept-alive connection, to complete its headers;
past it the client is answered 408 and the connection closed. Slow bodies are bounded in the
app (``body_limit.py``), where the body is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from encoder_service.settings import Settings, get_settings

IMPORT_PATH = "encoder_service.api.slow_clients:HeaderDeadlineProtocol"
TIMEOUT_BODY = b"request headers arrived too slowly"
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
    + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(TIMEOUT_BODY)
    + TIMEOUT_BODY
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline.

    ``header_timeout`` 0 reads ``ENCODER_API_HEADER_TIMEOUT_SECONDS`` when the first connection
    is made: worker processes are separate interpreters configured by the environment, and
    uvicorn takes the protocol class by import path. :func:`protocol_for` binds a value instead,
    for a server configured in code.
    """

    header_timeout: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timeout = self.header_timeout or get_settings().api_header_timeout_seconds
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self._timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()


def protocol_for(settings: Settings) -> type[HeaderDeadlineProtocol]:
    """The protocol class with ``settings``' header timeout bound, for a single-process server."""
    return type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout": settings.api_header_timeout_seconds},
    )
