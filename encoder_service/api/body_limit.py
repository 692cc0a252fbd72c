"""Request bodies: bounded in size and in the time they take to arrive.

Without a bound, one client could make a worker buffer an endless body, or trickle a body a
byte at a time and hold a request slot (see ``admission.py``) for as long as it likes. This
layer reads the whole body of every request that has one before the app sees it: a declared
``Content-Length`` over ``api_max_body_bytes`` is refused with 413 before a byte is read (so an
``Expect: 100-continue`` client never sends it), a chunked body as soon as it passes the limit,
and a body that has not arrived in full within ``api_body_timeout_seconds`` is answered 408.
The app then gets the body as one message. GET and HEAD requests pass untouched: no route reads
their body, so the single-GET fast path pays nothing here.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from encoder_service.api.problems import BODY_TOO_LARGE, REQUEST_TIMEOUT, problem_response

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
_CLOSE = {"Connection": "close"}


class BodyLimit:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._too_large(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            response = problem_response(
                REQUEST_TIMEOUT,
                f"the request body did not arrive within {self.timeout_seconds:g} s",
                scope["path"],
                headers=_CLOSE,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            BODY_TOO_LARGE,
            f"the request body exceeds {self.max_bytes} bytes",
            scope["path"],
            headers=_CLOSE,
            limit=self.max_bytes,
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent or unreadable (the read then enforces it)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` giving the buffered body once, then the client's own messages (so the app
    still learns of a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
