"""Lifecycle moves for operators (``admin`` scope): promote, deprecate, retire, roll back, who
reads a version, and the audit log. Each move is one registry transaction, recorded with the
key's name in the version's history and, with its outcome, in the audit log."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from encoder_service.api.auth import Principal
from encoder_service.api.deps import Admin, ServiceDep
from encoder_service.api.problems import (
    FORBIDDEN,
    INVALID_REQUEST,
    REDIS_UNAVAILABLE,
    UNAUTHENTICATED,
    UNKNOWN_VERSION,
    ProblemType,
    problem_response,
    problem_responses,
)
from encoder_service.api.responses import JSONBytesResponse
from encoder_service.api.schemas import VERSION_REGEX
from encoder_service.api.service import EmbeddingService, UnknownVersionError
from encoder_service.audit import AsyncAuditLog, AuditEntry
from encoder_service.registry import (
    RECENT_READ_SECONDS,
    InvalidTransitionError,
    VersionInUseError,
)
from encoder_service.registry import UnknownVersionError as UnregisteredError

router = APIRouter(prefix="/v1/admin", tags=["admin"])

INVALID_TRANSITION = ProblemType(
    "invalid-transition", 409, "Lifecycle move refused", "version 'v1' is active"
)
VERSION_IN_USE = ProblemType(
    "version-in-use", 409, "Version still read", "version 'v1' was read recently by recs-team"
)
_PROBLEMS = (UNAUTHENTICATED, FORBIDDEN, UNKNOWN_VERSION, INVALID_REQUEST, REDIS_UNAVAILABLE)

VersionPath = Annotated[
    str, Path(pattern=VERSION_REGEX, max_length=64, description="The version.", examples=["v2"])
]
RecentQuery = Annotated[
    float,
    Query(ge=0, description="A read within this many seconds counts as recent use."),
]


def _audit_log(request: Request, service: EmbeddingService) -> AsyncAuditLog:
    return AsyncAuditLog(service.client, maxlen=request.app.state.settings.audit_maxlen)


async def _move(
    request: Request,
    service: EmbeddingService,
    move: Awaitable[dict[str, Any]],
    *,
    action: str,
    admin: Principal,
    target: str = "",
) -> Response:
    """Run a registry move, audit its outcome, and answer its manifest or its refusal."""
    audit = _audit_log(request, service)
    origin = request.client.host if request.client else ""
    entry = AuditEntry(action, admin.name, "api", target, origin=origin)
    try:
        manifest = await move
    except UnregisteredError as exc:
        await audit.record(replace(entry, outcome="refused", detail=str(exc)))
        raise UnknownVersionError(str(exc), version=exc.version) from exc
    except VersionInUseError as exc:
        await audit.record(replace(entry, outcome="refused", detail=str(exc)))
        readers = [
            {"client": r.client, "reads": r.reads, "last_read_at": r.last_read_at}
            for r in exc.readers
        ]
        return problem_response(
            VERSION_IN_USE, str(exc), request.url.path, version=exc.version, readers=readers
        )
    except InvalidTransitionError as exc:
        await audit.record(replace(entry, outcome="refused", detail=str(exc)))
        return problem_response(INVALID_TRANSITION, str(exc), request.url.path)
    except Exception as exc:
        await audit.record(replace(entry, outcome="error", detail=f"{type(exc).__name__}: {exc}"))
        raise
    await audit.record(
        replace(entry, target=manifest["version"], detail=f"status {manifest['status']}")
    )
    service.versions.invalidate()
    return JSONBytesResponse(manifest)


@router.post(
    "/versions/{version}/promote",
    responses=problem_responses(INVALID_TRANSITION, *_PROBLEMS),
)
async def promote(
    version: VersionPath, request: Request, service: ServiceDep, admin: Admin
) -> Response:
    """Make a version active atomically; the previous active one becomes deprecated."""
    move = service.registry.promote(version, by=admin.name)
    return await _move(request, service, move, action="promote", admin=admin, target=version)


@router.post("/rollback", responses=problem_responses(INVALID_TRANSITION, *_PROBLEMS))
async def rollback(request: Request, service: ServiceDep, admin: Admin) -> Response:
    """Make the version the active one replaced active again, atomically."""
    return await _move(
        request, service, service.registry.rollback(by=admin.name), action="rollback", admin=admin
    )


@router.post(
    "/versions/{version}/deprecate",
    responses=problem_responses(INVALID_TRANSITION, *_PROBLEMS),
)
async def deprecate(
    version: VersionPath, request: Request, service: ServiceDep, admin: Admin
) -> Response:
    """Mark a version deprecated: still refreshed and served, telling readers to move."""
    move = service.registry.deprecate(version, by=admin.name)
    return await _move(request, service, move, action="deprecate", admin=admin, target=version)


@router.post(
    "/versions/{version}/retire",
    responses=problem_responses(INVALID_TRANSITION, VERSION_IN_USE, *_PROBLEMS),
)
async def retire(
    version: VersionPath,
    request: Request,
    service: ServiceDep,
    admin: Admin,
    force: Annotated[bool, Query(description="Retire even if readers used it recently.")] = False,
    recent_seconds: RecentQuery = RECENT_READ_SECONDS,
) -> Response:
    """Stop refreshing and serving a version; refused (409, naming them) while it is still read."""
    move = service.registry.retire(
        version, by=admin.name, force=force, recent_seconds=recent_seconds
    )
    return await _move(request, service, move, action="retire", admin=admin, target=version)


@router.get("/versions/{version}/readers", responses=problem_responses(*_PROBLEMS))
async def readers(
    version: VersionPath,
    service: ServiceDep,
    _: Admin,
    recent_seconds: RecentQuery = RECENT_READ_SECONDS,
) -> Response:
    """List the API keys that read a version recently, with their read counts."""
    await service.manifest(version)
    found = await service.registry.readers(version, since=time.time() - recent_seconds)
    body = [{"client": r.client, "reads": r.reads, "last_read_at": r.last_read_at} for r in found]
    return JSONBytesResponse({"version": version, "readers": body})


@router.get("/audit", responses=problem_responses(*_PROBLEMS))
async def audit(
    request: Request,
    service: ServiceDep,
    _: Admin,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most entries, newest first.")] = 100,
    action: Annotated[
        str | None, Query(max_length=64, description="Only this action, e.g. promote.")
    ] = None,
    actor: Annotated[
        str | None, Query(max_length=128, description="Only this key name or CLI user.")
    ] = None,
    version: Annotated[
        str | None, Query(pattern=VERSION_REGEX, max_length=64, description="Only this target.")
    ] = None,
) -> Response:
    """The audit log of admin actions (API and command line), newest first: who, what, when,
    and whether it was done, refused or failed."""
    entries = await _audit_log(request, service).list(
        limit, action=action, actor=actor, target=version
    )
    return JSONBytesResponse({"entries": [e.as_dict() for e in entries]})
