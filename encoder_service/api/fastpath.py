"""The hot path: a successful single-user embedding read, served below FastAPI.

``GET /v1/users/{user_id}/embedding`` is most of the traffic, and FastAPI's routing, parameter
validation and dependency solving cost more per request than the Redis read itself. This
middleware answers that one request shape directly — same checks, same service calls, same
body — and hands everything else to the app unchanged. Any refusal (bad id, missing or weak
key, unknown user or version, Redis down) is also handed to the app, which answers it with the
documented problem+json, so errors are defined in exactly one place. The FastAPI route stays,
so OpenAPI documents this endpoint and the slow path serves it identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from encoder_service.api import metrics
from encoder_service.api.auth import AuthenticationError, Authenticator
from encoder_service.api.responses import (
    DIM_HEADER,
    JSON,
    OCTET_STREAM,
    UPDATED_AT_HEADER,
    VERSION_HEADER,
)
from encoder_service.api.service import EmbeddingService, ServiceError
from encoder_service.store import USER_ID_PATTERN, VERSION_PATTERN

PREFIX = "/v1/users/"
SUFFIX = "/embedding"
ROUTE_TEMPLATE = "/v1/users/{user_id}/embedding"
# Accept values answered here; any other goes through content negotiation in the app.
_JSON_ACCEPTS = frozenset({b"", b"*/*", JSON.encode()})
_OCTET_ACCEPTS = frozenset({OCTET_STREAM.encode()})


@dataclass(frozen=True, slots=True)
class _RouteLabel:
    """What the metrics middleware reads of a matched route: its path template."""

    path: str


_ROUTE = _RouteLabel(ROUTE_TEMPLATE)


class EmbeddingFastPath:
    """ASGI middleware; see the module docstring for what it serves and what it hands on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or not (path := scope["path"]).startswith(PREFIX)
            or not path.endswith(SUFFIX)
            or not await self._serve(scope, send, path[len(PREFIX) : -len(SUFFIX)])
        ):
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, send: Send, user_id: str) -> bool:
        """Answer and return True, or return False having sent nothing."""
        if not USER_ID_PATTERN.fullmatch(user_id):
            return False
        authorization = accept = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"accept":
                accept = value
        binary = accept in _OCTET_ACCEPTS
        if not binary and accept not in _JSON_ACCEPTS:
            return False
        version = _version_param(scope["query_string"])
        if version is False:
            return False
        app = scope["app"]
        authenticator: Authenticator = app.state.authenticator
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        try:
            principal = authenticator.authenticate(token if scheme.lower() == "bearer" else None)
        except AuthenticationError:
            return False
        if "read" not in principal.scopes:
            return False
        service: EmbeddingService = app.state.service
        try:
            info = await service.resolve(version)
            stored = await service.embedding(info, user_id)
        except ServiceError:
            return False
        except Exception:  # noqa: BLE001 - Redis trouble: the app answers it as a problem
            return False
        metrics.record_served(info.version, principal.name, 1)
        service.reads.count(info.version, principal.name)
        scope.setdefault("state", {})["version"] = info.version
        scope["route"] = _ROUTE
        if binary:
            body = stored.vector.astype("<f4", copy=False).tobytes()
            headers = [
                (b"content-type", OCTET_STREAM.encode()),
                (VERSION_HEADER.lower().encode(), info.version.encode()),
                (DIM_HEADER.lower().encode(), str(info.dim).encode()),
                (UPDATED_AT_HEADER.lower().encode(), repr(stored.updated_at).encode()),
            ]
        else:
            body = orjson.dumps(
                {
                    "user_id": user_id,
                    "version": info.version,
                    "dim": info.dim,
                    "embedding": stored.vector,
                    "updated_at": stored.updated_at,
                },
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
            headers = [(b"content-type", JSON.encode())]
        headers += [(b"content-length", str(len(body)).encode()), (b"vary", b"Accept")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True


def _version_param(query: bytes) -> str | None | Literal[False]:
    """The ``version`` query value; None when absent; False when the app must judge the query."""
    if not query:
        return None
    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "version":
        return False
    value = params[0][1]
    return value if VERSION_PATTERN.fullmatch(value) else False
