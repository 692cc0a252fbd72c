"""The audit log: who did which admin action, to what, when, and how it ended.

Every lifecycle move, alignment, publish, export and import, from the API or the command line,
is recorded twice: as one structured log line (logger ``encoder_service.audit``, a JSON object)
so that it reaches the log collector even when Redis is what failed, and as an entry of the
capped stream ``{registry}:audit`` so that ``encoder-service audit`` and ``GET
/v1/admin/audit`` list it from anywhere. The stream shares the registry's hash tag, lives and is
persisted with it, and is trimmed to about ``ENCODER_AUDIT_MAXLEN`` entries.

Refusals (an unknown version, a retire guard, a transition the lifecycle forbids) are recorded
as ``refused`` and failures (Redis down) as ``error``: a trail of what was attempted, not only
of what succeeded. An entry never holds a key, only the key's name.
"""

from __future__ import annotations

import getpass
import logging
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, cast

import orjson
import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

from encoder_service.cluster import STORE_ERRORS
from encoder_service.registry import RegistryError

log = logging.getLogger("encoder_service.audit")

AUDIT_KEY = "{registry}:audit"
DEFAULT_MAXLEN = 100_000
Outcome = Literal["ok", "refused", "error"]
_PAGE = 500
# XREVRANGE over a non-decoding client (decode_responses=False in redis_connection): entry ids
# and fields are bytes; redis-py's reply type also covers decoding clients and pipelines (None).
_Page = list[tuple[bytes, Mapping[bytes, bytes]]]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One admin action; ``id`` is the stream entry id once stored."""

    action: str
    actor: str
    """The API key's name, or the command line's ``--by`` (default ``cli:<OS user>``)."""
    via: Literal["api", "cli"]
    target: str = ""
    outcome: Outcome = "ok"
    detail: str = ""
    origin: str = ""
    """The caller's address (API), or ``<OS user>@<host>`` (command line)."""
    at: float = field(default_factory=time.time)
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``at`` also as ISO-8601 UTC for people reading it."""
        at_iso = datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds")
        return {**asdict(self), "at_iso": at_iso}

    def _fields(self) -> dict[FieldT, EncodableT]:
        values: dict[FieldT, EncodableT] = {k: v for k, v in asdict(self).items()}
        del values["id"]
        values["at"] = repr(self.at)
        return values

    @classmethod
    def _from_stream(cls, entry_id: bytes, fields: Mapping[bytes, bytes]) -> AuditEntry:
        values: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
        values["at"] = float(values["at"])
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**{**known, "id": entry_id.decode()})

    def matches(self, *, action: str | None, actor: str | None, target: str | None) -> bool:
        return (
            (action is None or self.action == action)
            and (actor is None or self.actor == actor)
            and (target is None or self.target == target)
        )


def cli_origin() -> str:
    """Who is at the terminal, whatever ``--by`` claims: ``<OS user>@<host>``."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def cli_action(
    client: redis.Redis, action: str, target: str = "", *, actor: str | None = None
) -> AbstractContextManager[dict[str, str]]:
    """Audit the command-line action run inside (see :meth:`AuditLog.action`); ``actor``
    defaults to ``cli:<OS user>``."""
    from encoder_service.settings import get_settings

    audit = AuditLog(client, maxlen=get_settings().audit_maxlen)
    return audit.action(action, actor=actor or f"cli:{getpass.getuser()}", target=target)


def _log_line(entry: AuditEntry) -> None:
    level = logging.INFO if entry.outcome == "ok" else logging.WARNING
    log.log(level, "audit %s", orjson.dumps(entry.as_dict()).decode())


def _stored(entry_id: bytes | str, entry: AuditEntry) -> AuditEntry:
    return replace(entry, id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


class AuditLog:
    """Records and lists audit entries over a sync client (the command line)."""

    def __init__(self, client: redis.Redis, *, maxlen: int = DEFAULT_MAXLEN) -> None:
        self.client = client
        self.maxlen = maxlen

    def record(self, entry: AuditEntry) -> AuditEntry:
        """Log ``entry`` and append it to the stream; a Redis failure is logged, not raised,
        because the action it records has already happened (or failed) by now."""
        _log_line(entry)
        try:
            entry_id = self.client.xadd(
                AUDIT_KEY, entry._fields(), maxlen=self.maxlen, approximate=True
            )
        except STORE_ERRORS as exc:
            log.error("audit entry for %s not stored in Redis: %s", entry.action, exc)
            return entry
        return _stored(entry_id, entry)

    def list(
        self,
        limit: int = 50,
        *,
        action: str | None = None,
        actor: str | None = None,
        target: str | None = None,
    ) -> list[AuditEntry]:
        """The latest ``limit`` entries matching every filter given, newest first."""
        found: list[AuditEntry] = []
        upper = "+"
        while len(found) < limit:
            page = cast(_Page, self.client.xrevrange(AUDIT_KEY, max=upper, min="-", count=_PAGE))
            found += _matching(page, action=action, actor=actor, target=target)
            if len(page) < _PAGE:
                break
            upper = "(" + page[-1][0].decode()
        return found[:limit]

    @contextmanager
    def action(
        self, action: str, *, actor: str, target: str = "", origin: str = ""
    ) -> Iterator[dict[str, str]]:
        """Record the command-line action run inside: ``ok``, ``refused`` (a
        :class:`RegistryError`, or a ``ValueError`` or ``OSError`` the input caused) or
        ``error``.

        The yielded dict lets the body set ``target`` (when only the action learns it) and
        ``detail`` for the entry.
        """
        note = {"target": target, "detail": ""}
        entry = AuditEntry(action, actor, "cli", origin=origin or cli_origin())
        try:
            yield note
        except (RegistryError, ValueError, OSError) as exc:
            self.record(replace(entry, outcome="refused", detail=str(exc), target=note["target"]))
            raise
        except BaseException as exc:
            detail = f"{type(exc).__name__}: {exc}"
            self.record(replace(entry, outcome="error", detail=detail, target=note["target"]))
            raise
        self.record(replace(entry, detail=note["detail"], target=note["target"]))


class AsyncAuditLog:
    """The asyncio twin of :class:`AuditLog`, for the API."""

    def __init__(self, client: redis.asyncio.Redis, *, maxlen: int = DEFAULT_MAXLEN) -> None:
        self.client = client
        self.maxlen = maxlen

    async def record(self, entry: AuditEntry) -> AuditEntry:
        """See :meth:`AuditLog.record`."""
        _log_line(entry)
        try:
            entry_id = await self.client.xadd(
                AUDIT_KEY, entry._fields(), maxlen=self.maxlen, approximate=True
            )
        except STORE_ERRORS as exc:
            log.error("audit entry for %s not stored in Redis: %s", entry.action, exc)
            return entry
        return _stored(entry_id, entry)

    async def list(
        self,
        limit: int = 50,
        *,
        action: str | None = None,
        actor: str | None = None,
        target: str | None = None,
    ) -> list[AuditEntry]:
        """See :meth:`AuditLog.list`."""
        found: list[AuditEntry] = []
        upper = "+"
        while len(found) < limit:
            page = cast(
                _Page, await self.client.xrevrange(AUDIT_KEY, max=upper, min="-", count=_PAGE)
            )
            found += _matching(page, action=action, actor=actor, target=target)
            if len(page) < _PAGE:
                break
            upper = "(" + page[-1][0].decode()
        return found[:limit]


def _matching(
    page: _Page,
    *,
    action: str | None,
    actor: str | None,
    target: str | None,
) -> list[AuditEntry]:
    entries = (AuditEntry._from_stream(entry_id, fields) for entry_id, fields in page)
    return [e for e in entries if e.matches(action=action, actor=actor, target=target)]
