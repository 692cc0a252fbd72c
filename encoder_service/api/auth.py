"""API keys with scopes, sent as ``Authorization: Bearer <key>``.

Configuration holds only the SHA-256 of each key, so a leaked config file or environment dump
grants nothing. An entry of ``ENCODER_API_KEYS`` reads ``name:scope+scope:sha256hex``; entries
are separated by commas, e.g.::

    ENCODER_API_KEYS="recs-team:read:9f86d0...,refresher:ingest:2c26b4...,ops:read+admin:fcde2b..."

Scopes are independent (``admin`` does not imply ``read``): list every scope a key needs.
Generate a key and its entry with :func:`new_api_key`, or hash an existing key with
:func:`hash_api_key`::

    python -c "from encoder_service.api.auth import new_api_key as k; print(k('recs', ['read']))"

prints ``(key, entry)``: give the key to the consumer, append the entry to ``ENCODER_API_KEYS``.

The name appears in logs and in the per-consumer metrics, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from fastapi import Request
from fastapi.security import HTTPBearer

from encoder_service.settings import Settings

log = logging.getLogger(__name__)

Scope = Literal["read", "ingest", "admin"]
SCOPES: frozenset[str] = frozenset(get_args(Scope))
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class AuthenticationError(Exception):
    """No key, or a key matching no configured entry (401)."""


class PermissionDeniedError(Exception):
    """A valid key without the scope the endpoint needs (403)."""

    def __init__(self, detail: str, scope: str) -> None:
        super().__init__(detail)
        self.scope = scope


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: who holds it, what it may do, and the SHA-256 hex of the key."""

    name: str
    scopes: frozenset[str]
    digest: str


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a request was authenticated as."""

    name: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", SCOPES)


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``: what goes into ``ENCODER_API_KEYS``."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(name: str, scopes: Iterable[str]) -> tuple[str, str]:
    """A fresh random key (hand it to the consumer once) and its ``ENCODER_API_KEYS`` entry."""
    key = secrets.token_urlsafe(32)
    entry = f"{name}:{'+'.join(scopes)}:{hash_api_key(key)}"
    parse_api_keys(entry)  # refuse a bad name or scope now rather than at the server's start
    return key, entry


def parse_api_keys(text: str) -> list[ApiKey]:
    """Parse ``name:scope+scope:sha256hex`` entries separated by commas.

    Raises:
        ValueError: an entry is malformed, names an unknown scope, or repeats a name; the
            server refuses to start rather than silently locking a consumer out.
    """
    keys: list[ApiKey] = []
    for position, entry in enumerate(filter(None, (e.strip() for e in text.split(","))), 1):
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"API key entry {position} is not `name:scope+scope:sha256hex`")
        name, scope_text, digest = parts
        scopes = frozenset(filter(None, scope_text.split("+")))
        if not _NAME.fullmatch(name):
            raise ValueError(f"API key entry {position} has an invalid name {name!r}")
        if not scopes or not scopes <= SCOPES:
            raise ValueError(
                f"API key {name!r} has scopes {sorted(scopes)}; use some of {sorted(SCOPES)}"
            )
        if not _HEX_DIGEST.fullmatch(digest.lower()):
            raise ValueError(
                f"API key {name!r} must give the 64-character SHA-256 hex of the key, "
                "not the key itself"
            )
        if any(k.name == name for k in keys):
            raise ValueError(f"API key name {name!r} appears twice")
        keys.append(ApiKey(name, scopes, digest.lower()))
    return keys


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, or refuses it."""

    def __init__(self, keys: list[ApiKey], *, enabled: bool = True) -> None:
        self.keys = keys
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Build from ``auth_mode`` and ``api_keys``, warning about configurations that open
        everything (``none``) or refuse everything (no keys)."""
        if settings.auth_mode == "none":
            log.warning(
                "API authentication is OFF (ENCODER_AUTH_MODE=none): anyone reaching this "
                "port can read, ingest and administer; use it for local development only"
            )
            return cls([], enabled=False)
        keys = parse_api_keys(settings.api_keys)
        if not keys:
            log.warning("no API keys configured (ENCODER_API_KEYS): every /v1 request gets 401")
        return cls(keys)

    def authenticate(self, token: str | None) -> Principal:
        """Match ``token`` against every configured digest.

        Every entry is compared, in constant time, whether or not an earlier one matched, so
        the response time says nothing about which keys exist.
        """
        if not self.enabled:
            return ANONYMOUS
        if not token:
            raise AuthenticationError("send an API key as `Authorization: Bearer <key>`")
        digest = hash_api_key(token)
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise AuthenticationError("the API key is not valid")
        return Principal(found.name, found.scopes)


class ScopeGuard(HTTPBearer):
    """A dependency admitting only callers whose key carries ``scope``; it returns the caller.

    It is FastAPI's HTTP bearer scheme, so that OpenAPI documents the ``Authorization``
    header, with the scope check folded into the same call: one dependency per request rather
    than two, which FastAPI's per-dependency cost makes worth it on the hot path.
    """

    def __init__(self, scope: Scope) -> None:
        super().__init__(
            scheme_name="APIKey",
            description="An API key, as `Authorization: Bearer <key>`; each endpoint says "
            "which scope (read, ingest, admin) the key must carry.",
            auto_error=False,
        )
        self.scope = scope

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        authenticator: Authenticator = request.app.state.authenticator
        principal = authenticator.authenticate(token if scheme.lower() == "bearer" else None)
        if self.scope not in principal.scopes:
            raise PermissionDeniedError(
                f"the API key {principal.name!r} lacks the {self.scope!r} scope", self.scope
            )
        return principal


def require_scope(scope: Scope) -> ScopeGuard:
    """The dependency for endpoints needing ``scope``.

    Example:
        ``Admin = Annotated[Principal, Depends(require_scope("admin"))]``
    """
    return ScopeGuard(scope)
