"""Lifecycle moves for operators (``admin`` scope): promote, deprecate, retire, roll back, and
who reads a version. Each move is one registry transaction and is recorded with the key's name."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

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


async def _move(
    request: Request, service: EmbeddingService, move: Awaitable[dict[str, Any]]
) -> Response:
    """Run a registry move and answer its manifest, or its refusal as a problem."""
    try:
        manifest = await move
    except UnregisteredError as exc:
        raise UnknownVersionError(str(exc), version=exc.version) from exc
    except VersionInUseError as exc:
        readers = [
            {"client": r.client, "reads": r.reads, "last_read_at": r.last_read_at}
            for r in exc.readers
        ]
        return problem_response(
            VERSION_IN_USE, str(exc), request.url.path, version=exc.version, readers=readers
        )
    except InvalidTransitionError as exc:
        return problem_response(INVALID_TRANSITION, str(exc), request.url.path)
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
    return await _move(request, service, service.registry.promote(version, by=admin.name))


@router.post("/rollback", responses=problem_responses(INVALID_TRANSITION, *_PROBLEMS))
async def rollback(request: Request, service: ServiceDep, admin: Admin) -> Response:
    """Make the version the active one replaced active again, atomically."""
    return await _move(request, service, service.registry.rollback(by=admin.name))


@router.post(
    "/versions/{version}/deprecate",
    responses=problem_responses(INVALID_TRANSITION, *_PROBLEMS),
)
async def deprecate(
    version: VersionPath, request: Request, service: ServiceDep, admin: Admin
) -> Response:
    """Mark a version deprecated: still refreshed and served, telling readers to move."""
    return await _move(request, service, service.registry.deprecate(version, by=admin.name))


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
    return await _move(request, service, move)


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
