"""The framework ceiling: the service's single-user GET as a raw ASGI app, with no framework.

It does the per-request work the service cannot avoid and nothing else: parse the path, one
Redis round trip through redis.asyncio with hiredis for the same keys the service reads (the
embedding and the user's meta record, one MGET), decode them with the store's own codec, and
send the same JSON body or the raw float32 bytes. No routing table, validation, middleware,
auth, metrics, version lookup or read coalescing. Under the same uvicorn and worker count, the
service's throughput over this one's is what the framework and the service's features cost.

The keys and codec come from ``encoder_service.store``, so the ceiling follows the store's
layout when it changes. Run with ``uvicorn serving.bare_asgi:app --app-dir benchmarks`` and
``BARE_REDIS_URL``, ``BARE_VERSION`` and ``BARE_DIM`` in the environment.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import redis.asyncio

from encoder_service.store import decode_embedding, decode_meta, embedding_key, meta_key

PREFIX = "/v1/users/"
SUFFIX = "/embedding"
VERSION = os.environ.get("BARE_VERSION", "bench")
DIM = int(os.environ.get("BARE_DIM", "64"))

JSON_HEADERS = [(b"content-type", b"application/json")]
BINARY_HEADERS = [(b"content-type", b"application/octet-stream")]

_client: redis.asyncio.Redis | None = None


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any) -> None:
    global _client
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _client = redis.asyncio.Redis.from_url(os.environ["BARE_REDIS_URL"], max_connections=64)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _wants_binary(scope: dict[str, Any]) -> bool:
    return any(k == b"accept" and b"application/octet-stream" in v for k, v in scope["headers"])


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET /v1/users/{id}/embedding (JSON or octet-stream) and GET /readyz."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    path: str = scope["path"]
    if path == "/readyz":
        await _client.ping()
        await _send(send, 200, JSON_HEADERS, b'{"status":"ready"}')
        return
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        await _send(send, 404, JSON_HEADERS, b'{"detail":"not found"}')
        return
    user_id = path[len(PREFIX) : -len(SUFFIX)]
    raw, meta = await _client.mget(embedding_key(VERSION, user_id), meta_key(user_id))
    if raw is None:
        await _send(send, 404, JSON_HEADERS, b'{"detail":"no embedding"}')
        return
    vector = decode_embedding(raw, DIM)
    if _wants_binary(scope):
        await _send(send, 200, BINARY_HEADERS, vector.tobytes())
        return
    updated_at, _ = decode_meta(meta)
    body = orjson.dumps(
        {
            "user_id": user_id,
            "version": VERSION,
            "dim": DIM,
            "embedding": vector,
            "updated_at": updated_at,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    await _send(send, 200, JSON_HEADERS, body)
