"""Every error as ``application/problem+json`` (RFC 9457) with a stable ``type`` per kind.

Clients branch on ``type`` (``urn:encoder-service:problem:<slug>``), never on ``detail``, whose
wording may change. No response carries a stack trace or an exception's text from a library:
unexpected errors are logged here and answered with a bare ``internal-error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from encoder_service.api import metrics
from encoder_service.api.auth import AuthenticationError, PermissionDeniedError
from encoder_service.api.schemas import Problem
from encoder_service.api.service import (
    BatchTooLargeError,
    CorruptStoredEmbeddingError,
    NoActiveVersionError,
    RetiredVersionError,
    ServiceError,
    UnknownUserError,
    UnknownVersionError,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:encoder-service:problem:"
_REF = "#/components/schemas/"
_RETRY_AFTER_DOC = {
    "Retry-After": {
        "description": "Seconds to wait before retrying; sent when the store is unreachable "
        "or the server is overloaded.",
        "schema": {"type": "integer"},
    }
}


@dataclass(frozen=True, slots=True)
class ProblemType:
    slug: str
    status: int
    title: str
    example: str = ""  # a typical ``detail``, for the OpenAPI examples

    @property
    def uri(self) -> str:
        return TYPE_PREFIX + self.slug


UNKNOWN_USER = ProblemType(
    "unknown-user", 404, "Unknown user", "user 'u42' has no embedding under version 'v1'"
)
UNKNOWN_VERSION = ProblemType(
    "unknown-version", 404, "Unknown version", "version 'v9' is not registered"
)
RETIRED_VERSION = ProblemType(
    "retired-version", 410, "Version retired", "version 'v0' is retired and no longer served"
)
NO_ACTIVE_VERSION = ProblemType(
    "no-active-version", 503, "No active version", "no version is active; name one"
)
INVALID_REQUEST = ProblemType(
    "invalid-request", 422, "Invalid request", "the request does not match the API"
)
BATCH_TOO_LARGE = ProblemType(
    "batch-too-large", 413, "Batch too large", "1500 ids in one batch; at most 1000 are allowed"
)
UNAUTHENTICATED = ProblemType(
    "unauthenticated", 401, "Missing or unknown API key", "the API key is not valid"
)
FORBIDDEN = ProblemType(
    "insufficient-scope", 403, "API key lacks a scope", "the API key 'etl' lacks the 'read' scope"
)
REDIS_UNAVAILABLE = ProblemType(
    "store-unavailable", 503, "Embedding store unavailable", "the embedding store cannot be reached"
)
OVERLOADED = ProblemType(
    "overloaded", 503, "Server overloaded", "the server is at capacity; retry after a moment"
)
BODY_TOO_LARGE = ProblemType(
    "body-too-large", 413, "Request body too large", "the body exceeds 1048576 bytes"
)
REQUEST_TIMEOUT = ProblemType(
    "request-timeout", 408, "Request timeout", "the request body did not arrive within 10 s"
)
CORRUPT_EMBEDDING = ProblemType(
    "corrupt-embedding", 500, "Stored embedding unreadable", "the stored embedding is unreadable"
)
INTERNAL_ERROR = ProblemType(
    "internal-error", 500, "Internal error", "the server failed to answer; the error is logged"
)
NOT_FOUND = ProblemType("not-found", 404, "Not found", "Not Found")
METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", 405, "Method not allowed")

_SERVICE_PROBLEMS: dict[type[ServiceError], ProblemType] = {
    UnknownUserError: UNKNOWN_USER,
    UnknownVersionError: UNKNOWN_VERSION,
    RetiredVersionError: RETIRED_VERSION,
    NoActiveVersionError: NO_ACTIVE_VERSION,
    BatchTooLargeError: BATCH_TOO_LARGE,
    CorruptStoredEmbeddingError: CORRUPT_EMBEDDING,
}
# Connection refused, timeouts, a server still loading its data, no free pooled connection; on
# a Redis Cluster also no reachable node, a slot without a node, a cluster marked down, a slot
# being resharded: all pass, so the client is told to come back. Other Redis errors are bugs
# (500).
_UNAVAILABLE_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.RedisClusterException,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def problem_response(
    kind: ProblemType,
    detail: str,
    instance: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body = {
        "type": kind.uri,
        "title": kind.title,
        "status": kind.status,
        "detail": detail,
        "instance": instance,
        **extensions,
    }
    return Response(
        orjson.dumps(body), status_code=kind.status, media_type=PROBLEM_JSON, headers=headers
    )


def _retry_after(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.settings.retry_after_seconds)}


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    kind = next(_SERVICE_PROBLEMS[c] for c in type(exc).__mro__ if c in _SERVICE_PROBLEMS)
    # ``context`` is echoed in the body; it never sets headers.
    return problem_response(kind, str(exc), request.url.path, headers=None, **exc.context)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Only where and what: echoing ``input`` could reflect a megabyte body back.
    errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return problem_response(
        INVALID_REQUEST, "the request does not match the API", request.url.path, errors=errors
    )


async def _unauthenticated(request: Request, exc: Exception) -> Response:
    return problem_response(
        UNAUTHENTICATED, str(exc), request.url.path, headers={"WWW-Authenticate": "Bearer"}
    )


async def _forbidden(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PermissionDeniedError)
    challenge = f'Bearer error="insufficient_scope", scope="{exc.scope}"'
    return problem_response(
        FORBIDDEN,
        str(exc),
        request.url.path,
        headers={"WWW-Authenticate": challenge},
        scope=exc.scope,
    )


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    metrics.REDIS_ERRORS.labels(type(exc).__name__).inc()
    log.warning("Redis unavailable on %s: %s", request.url.path, exc)
    return problem_response(
        REDIS_UNAVAILABLE,
        "the embedding store cannot be reached; retry shortly",
        request.url.path,
        headers=_retry_after(request),
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot even decode (not UTF-8, say): as malformed as
        # bad JSON, which it answers with 422, so both get the same problem.
        return problem_response(INVALID_REQUEST, str(exc.detail), request.url.path, errors=[])
    kind = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(
        exc.status_code, ProblemType("http-error", exc.status_code, "HTTP error")
    )
    return problem_response(kind, str(exc.detail), request.url.path, headers=exc.headers)


def install_problem_handlers(app: FastAPI) -> None:
    """Route every known error class to its problem response, catch the unknown ones, and
    publish the ``Problem`` schema the routes' error responses refer to."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AuthenticationError, _unauthenticated)
    app.add_exception_handler(PermissionDeniedError, _forbidden)
    app.add_exception_handler(HTTPException, _http_error)
    for error in _UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, _store_unavailable)
    app.add_middleware(UnhandledErrorMiddleware)

    def openapi() -> dict[str, Any]:
        return _add_transport_problems(_add_problem_schema(FastAPI.openapi(app)))

    app.openapi = openapi  # type: ignore[method-assign]


class UnhandledErrorMiddleware:
    """Answer anything no handler claimed with ``internal-error``, logging the traceback once.

    Starlette's own catch-all answers, then re-raises, so the server logs the error a second
    time; this one stops the exception here unless the response has already begun.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if isinstance(exc, redis.exceptions.RedisError):
                metrics.REDIS_ERRORS.labels(type(exc).__name__).inc()
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            response = problem_response(INTERNAL_ERROR, INTERNAL_ERROR.example, scope["path"])
            await response(scope, receive, send)


def problem_responses(*kinds: ProblemType) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring ``kinds`` as problem+json, one per status."""
    by_status: dict[int, list[ProblemType]] = {}
    for kind in kinds:
        by_status.setdefault(kind.status, []).append(kind)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, group in by_status.items():
        examples = {
            k.slug: {
                "value": {"type": k.uri, "title": k.title, "status": k.status, "detail": k.example}
            }
            for k in group
        }
        responses[status] = {
            "description": " or ".join(f"{k.title} (`{k.slug}`)" for k in group),
            "content": {PROBLEM_JSON: {"schema": {"$ref": _REF + "Problem"}, "examples": examples}},
        }
        if REDIS_UNAVAILABLE in group or OVERLOADED in group:
            responses[status]["headers"] = _RETRY_AFTER_DOC
    return responses


def _add_problem_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    schema = Problem.model_json_schema(ref_template=_REF + "{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["Problem"] = schema
    return openapi


def _add_transport_problems(openapi: dict[str, Any]) -> dict[str, Any]:
    """Declare the refusals of the layers below the routes (``admission.py``, ``body_limit.py``)
    on every operation they apply to: ``overloaded`` on the ``/v1`` API (the probes and
    ``/metrics`` outside it are never refused), and the body's size and time limits on every
    operation that takes a body."""
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            kinds = [OVERLOADED] if path.startswith("/v1/") else []
            if method in {"post", "put", "patch", "delete"}:
                kinds += [BODY_TOO_LARGE, REQUEST_TIMEOUT]
            responses = operation.setdefault("responses", {})
            for status, entry in problem_responses(*kinds).items():
                existing = responses.get(str(status))
                if existing is None:
                    responses[str(status)] = entry
                    continue
                existing["description"] += " or " + entry["description"]
                examples = existing.setdefault("content", {}).setdefault(
                    PROBLEM_JSON, {"schema": {"$ref": _REF + "Problem"}}
                )
                examples.setdefault("examples", {}).update(
                    entry["content"][PROBLEM_JSON]["examples"]
                )
                existing.setdefault("headers", {}).update(entry.get("headers", {}))
    return openapi
