"""Typed errors: one class per problem ``type`` the API sends, plus the adapter's own refusals.

Callers branch on the class (or ``ApiError.slug``), never on the message. The server's
``application/problem+json`` body is kept on the exception for logs.
"""

from __future__ import annotations

import json
from typing import Any

PROBLEM_PREFIX = "urn:encoder-service:problem:"


class AdapterError(Exception):
    """Anything this package raises on purpose."""


class VersionMismatchError(AdapterError):
    """The server's version, dimension or schema hash differs from what a head was trained on."""


class ApiError(AdapterError):
    """An error answer from the API; ``slug`` is the last part of the problem ``type``."""

    slug = "http-error"

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {self.slug}: {detail}")
        self.status = status
        self.detail = detail
        self.problem = problem or {}
        self.retry_after: float | None = None


class UnknownUserError(ApiError):
    slug = "unknown-user"


class UnknownVersionError(ApiError):
    slug = "unknown-version"


class RetiredVersionError(ApiError):
    slug = "retired-version"


class NoActiveVersionError(ApiError):
    slug = "no-active-version"


class InvalidRequestError(ApiError):
    slug = "invalid-request"


class BatchTooLargeError(ApiError):
    slug = "batch-too-large"


class UnauthenticatedError(ApiError):
    slug = "unauthenticated"


class InsufficientScopeError(ApiError):
    slug = "insufficient-scope"


class StoreUnavailableError(ApiError):
    """503 from the server; retried by the client before it surfaces."""

    slug = "store-unavailable"


class RateLimitedError(ApiError):
    """429; retried by the client before it surfaces."""

    slug = "rate-limited"


_BY_SLUG: dict[str, type[ApiError]] = {
    cls.slug: cls
    for cls in (
        UnknownUserError,
        UnknownVersionError,
        RetiredVersionError,
        NoActiveVersionError,
        InvalidRequestError,
        BatchTooLargeError,
        UnauthenticatedError,
        InsufficientScopeError,
        StoreUnavailableError,
        RateLimitedError,
    )
}


def error_from_response(status: int, body: bytes, headers: dict[str, str]) -> ApiError:
    """Map an error response to its class: by problem ``type`` when the body is problem+json,
    else by status (429 and 503 keep their retryable classes)."""
    problem: dict[str, Any] = {}
    try:
        parsed = json.loads(body) if body else {}
        problem = parsed if isinstance(parsed, dict) else {}
    except ValueError:
        pass
    kind = str(problem.get("type", ""))
    slug = kind.removeprefix(PROBLEM_PREFIX) if kind.startswith(PROBLEM_PREFIX) else ""
    cls = _BY_SLUG.get(slug)
    if cls is None:
        cls = {429: RateLimitedError, 503: StoreUnavailableError}.get(status, ApiError)
    fallback = body[:200].decode(errors="replace")
    detail = str(problem.get("detail") or problem.get("title") or fallback)
    error = cls(status, detail, problem)
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        try:
            error.retry_after = float(retry_after)
        except ValueError:
            error.retry_after = None
    return error
