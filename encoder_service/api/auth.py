"""API keys with scopes, sent as ``Authorization: Bearer <key>``.

Configuration holds only a salted hash of each key, so a leaked config file, environment dump or
secret grants nothing, and the same key hashed for two deployments looks different in each. An
entry reads ``name:scope+scope:salt:digest``, where ``salt`` is 16 random bytes in hex and
``digest`` is HMAC-SHA256 of the key under that salt; entries are separated by commas (in
``ENCODER_API_KEYS``) or by commas and newlines (in the file ``ENCODER_API_KEYS_FILE`` names)::

    ENCODER_API_KEYS="recs-team:read:4f1c...:9f86d0...,ops:read+admin:a03e...:fcde2b..."

A fast keyed hash rather than a slow password hash: keys are 256 random bits from
:func:`new_api_key`, so nobody can guess one from its digest whatever the hash costs, while every
request pays it. Entries of the older unsalted form ``name:scopes:sha256hex`` still authenticate
(each one logs a warning at load); ``encoder-service keys hash`` turns a key into a salted entry
without reissuing it.

Scopes are independent (``admin`` does not imply ``read``): list every scope a key needs.

Keys rotate without a restart: the key set is re-read from the keys file when the file changes
(checked every ``api_keys_reload_seconds``) and at once on SIGHUP. A reload that fails (a
malformed entry) keeps the previous set and logs the error, so a typo never locks everyone out.

The name appears in logs, audit entries and per-consumer metrics; the key never does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from fastapi import Request
from fastapi.security import HTTPBearer

from encoder_service.settings import Settings

log = logging.getLogger(__name__)

Scope = Literal["read", "ingest", "admin"]
SCOPES: frozenset[str] = frozenset(get_args(Scope))
SALT_BYTES = 16
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX_SALT = re.compile(r"(?:[0-9a-f]{2}){8,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_SEPARATORS = re.compile(r"[,\n]")


class AuthenticationError(Exception):
    """No key, or a key matching no configured entry (401)."""


class PermissionDeniedError(Exception):
    """A valid key without the scope the endpoint needs (403)."""

    def __init__(self, detail: str, scope: str) -> None:
        super().__init__(detail)
        self.scope = scope


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: who holds it, what it may do, and how to recognise it.

    ``salt`` is empty for an entry of the older unsalted form, whose ``digest`` is the plain
    SHA-256 of the key.
    """

    name: str
    scopes: frozenset[str]
    digest: str
    salt: bytes = b""

    def digest_of(self, key: bytes) -> str:
        """What this entry's digest would be if ``key`` were its key."""
        if self.salt:
            return hmac.digest(self.salt, key, "sha256").hex()
        return hashlib.sha256(key).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a request was authenticated as."""

    name: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", SCOPES)


def hash_api_key(key: str) -> str:
    """The unsalted SHA-256 hex of ``key``: the older entry form, still accepted."""
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_entry(name: str, scopes: Iterable[str], key: str) -> str:
    """The salted config entry of an existing ``key``, with a fresh random salt.

    Raises:
        ValueError: a bad name or scope, refused now rather than at the server's start.
    """
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hmac.digest(salt, key.encode(), "sha256").hex()
    entry = f"{name}:{'+'.join(scopes)}:{salt.hex()}:{digest}"
    parse_api_keys(entry)
    return entry


def new_api_key(name: str, scopes: Iterable[str]) -> tuple[str, str]:
    """A fresh random key (hand it to the consumer once) and its salted config entry."""
    key = secrets.token_urlsafe(32)
    return key, api_key_entry(name, scopes, key)


def parse_api_keys(text: str) -> list[ApiKey]:
    """Parse ``name:scope+scope:salt:digest`` (or older ``name:scope+scope:sha256hex``) entries
    separated by commas or newlines; a line starting with ``#`` is a comment.

    Raises:
        ValueError: an entry is malformed, names an unknown scope, or repeats a name; the
            server refuses to start rather than silently locking a consumer out.
    """
    lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    entries = (e.strip() for e in _SEPARATORS.split("\n".join(lines)))
    keys: list[ApiKey] = []
    for position, entry in enumerate(filter(None, entries), 1):
        parts = entry.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"API key entry {position} is not `name:scope+scope:salt:digest`")
        name, scope_text, *hashed = parts
        scopes = frozenset(filter(None, scope_text.split("+")))
        if not _NAME.fullmatch(name):
            raise ValueError(f"API key entry {position} has an invalid name {name!r}")
        if not scopes or not scopes <= SCOPES:
            raise ValueError(
                f"API key {name!r} has scopes {sorted(scopes)}; use some of {sorted(SCOPES)}"
            )
        salt = hashed[0].lower() if len(hashed) == 2 else ""
        digest = hashed[-1].lower()
        salt_ok = len(hashed) == 1 or _HEX_SALT.fullmatch(salt)
        if not (salt_ok and _HEX_DIGEST.fullmatch(digest)):
            raise ValueError(
                f"API key {name!r} must give a hex salt and the 64-character hex digest of the "
                "key (`encoder-service keys new` or `keys hash`), not the key itself"
            )
        if any(k.name == name for k in keys):
            raise ValueError(f"API key name {name!r} appears twice")
        keys.append(ApiKey(name, scopes, digest, bytes.fromhex(salt)))
    return keys


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten or replaced; None when it is missing."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, or refuses it.

    The key set comes from ``ENCODER_API_KEYS`` plus the keys file, and is replaced whole by a
    reload, so a request sees either the old set or the new one, never a mixture.
    """

    def __init__(
        self,
        keys: list[ApiKey],
        *,
        enabled: bool = True,
        inline: str = "",
        keys_file: Path | None = None,
        reload_seconds: float = 2.0,
    ) -> None:
        self.enabled = enabled
        self.keys = tuple(keys)
        self._inline = inline
        self._file = keys_file
        self._reload_seconds = reload_seconds
        self._stamp = _file_stamp(keys_file) if keys_file else None
        self._checked_at = time.monotonic()
        self._verified: dict[bytes, Principal] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Build from ``auth_mode``, ``api_keys`` and ``api_keys_file``, warning about
        configurations that open everything (``none``) or refuse everything (no keys).

        Raises:
            ValueError: an entry is malformed, or the keys file cannot be read.
        """
        if settings.auth_mode == "none":
            log.warning(
                "API authentication is OFF (ENCODER_AUTH_MODE=none): anyone reaching this "
                "port can read, ingest and administer; use it for local development only"
            )
            return cls([], enabled=False)
        authenticator = cls(
            [],
            inline=settings.api_keys,
            keys_file=settings.api_keys_file,
            reload_seconds=settings.api_keys_reload_seconds,
        )
        authenticator.keys = tuple(authenticator._load())
        _warn_about(authenticator.keys)
        return authenticator

    def _load(self) -> list[ApiKey]:
        text = self._inline
        if self._file is not None:
            try:
                text += "\n" + self._file.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read the API keys file {self._file}: {exc}") from exc
        return parse_api_keys(text)

    def reload(self) -> bool:
        """Re-read the key set now; on a bad entry keep the current one. True if it changed."""
        if not self.enabled:
            return False
        self._stamp = _file_stamp(self._file) if self._file else None
        try:
            keys = tuple(self._load())
        except ValueError as exc:
            log.error("API keys NOT reloaded, the previous %d stay: %s", len(self.keys), exc)
            return False
        if keys == self.keys:
            return False
        self.keys, self._verified = keys, {}
        _warn_about(keys)
        log.info("API keys reloaded: %d keys (%s)", len(keys), ", ".join(k.name for k in keys))
        return True

    def _reload_if_file_changed(self) -> None:
        """At most once per ``reload_seconds``, one stat of the keys file."""
        now = time.monotonic()
        if self._file is None or now - self._checked_at < self._reload_seconds:
            return
        self._checked_at = now
        if _file_stamp(self._file) != self._stamp:
            self.reload()

    @contextmanager
    def reloading_on_sighup(self) -> Iterator[None]:
        """While inside, SIGHUP reloads the key set in the running event loop.

        Only the main thread can own a signal; elsewhere (an app served from a thread) the file
        watch still rotates keys. Under several workers uvicorn's supervisor answers SIGHUP by
        restarting them, which re-reads the keys the same way.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError):
            log.debug("SIGHUP reload unavailable in this thread; the keys file is still watched")
            yield
            return
        try:
            yield
        finally:
            with suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)

    def authenticate(self, token: str | None) -> Principal:
        """Match ``token`` against every configured entry.

        Every entry is compared, in constant time, whether or not an earlier one matched, so
        the response time says nothing about which keys exist. A key that matched once is
        remembered under its SHA-256 until the next reload, so the hot path hashes once per
        request rather than once per entry; only matches are remembered, so the memo holds at
        most one item per entry.
        """
        if not self.enabled:
            return ANONYMOUS
        if not token:
            raise AuthenticationError("send an API key as `Authorization: Bearer <key>`")
        self._reload_if_file_changed()
        raw = token.encode()
        memo = hashlib.sha256(raw).digest()
        principal = self._verified.get(memo)
        if principal is not None:
            return principal
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(key.digest_of(raw), key.digest):
                found = key
        if found is None:
            raise AuthenticationError("the API key is not valid")
        principal = self._verified[memo] = Principal(found.name, found.scopes)
        return principal


def _warn_about(keys: Iterable[ApiKey]) -> None:
    keys = list(keys)
    if not keys:
        log.warning(
            "no API keys configured (ENCODER_API_KEYS, ENCODER_API_KEYS_FILE): every /v1 "
            "request gets 401"
        )
    unsalted = [k.name for k in keys if not k.salt]
    if unsalted:
        log.warning(
            "API keys %s use the older unsalted entry form; re-hash each with "
            "`encoder-service keys hash NAME --scope ...` (the key itself stays valid)",
            ", ".join(unsalted),
        )


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
