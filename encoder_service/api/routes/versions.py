"""The version registry, read-only: which versions exist, which is active, their manifests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from encoder_service.api.deps import Reader, ServiceDep
from encoder_service.api.problems import (
    FORBIDDEN,
    INVALID_REQUEST,
    REDIS_UNAVAILABLE,
    UNAUTHENTICATED,
    UNKNOWN_VERSION,
    problem_responses,
)
from encoder_service.api.responses import JSONBytesResponse
from encoder_service.api.schemas import VERSION_REGEX, VersionList, VersionManifest

router = APIRouter(prefix="/v1/versions", tags=["versions"])

VersionPath = Annotated[
    str, Path(pattern=VERSION_REGEX, max_length=64, description="The version.", examples=["v1"])
]


@router.get(
    "",
    response_model=VersionList,
    responses=problem_responses(UNAUTHENTICATED, FORBIDDEN, REDIS_UNAVAILABLE),
)
async def list_versions(service: ServiceDep, _: Reader) -> Response:
    """List every version, oldest first, and name the active one."""
    active, manifests = await service.manifests()
    return JSONBytesResponse({"active": active, "versions": manifests})


@router.get(
    "/{version}",
    response_model=VersionManifest,
    responses=problem_responses(
        UNAUTHENTICATED, FORBIDDEN, UNKNOWN_VERSION, INVALID_REQUEST, REDIS_UNAVAILABLE
    ),
)
async def read_version(version: VersionPath, service: ServiceDep, _: Reader) -> Response:
    """Read one version's manifest: dim, dtype, schema hash, status, creation time, metrics."""
    return JSONBytesResponse(await service.manifest(version))
