"""Reading embeddings: one user (JSON or binary by ``Accept``), or a batch in request order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from encoder_service.api import metrics
from encoder_service.api.deps import Reader, service_of
from encoder_service.api.problems import (
    BATCH_TOO_LARGE,
    CORRUPT_EMBEDDING,
    FORBIDDEN,
    INVALID_REQUEST,
    NO_ACTIVE_VERSION,
    REDIS_UNAVAILABLE,
    RETIRED_VERSION,
    UNAUTHENTICATED,
    UNKNOWN_USER,
    UNKNOWN_VERSION,
    problem_responses,
)
from encoder_service.api.responses import (
    DIM_HEADER,
    JSON,
    NPY,
    OCTET_STREAM,
    UPDATED_AT_HEADER,
    VERSION_HEADER,
    JSONBytesResponse,
    binary_embedding,
    negotiate,
)
from encoder_service.api.schemas import (
    USER_ID_REGEX,
    VERSION_REGEX,
    BatchRequest,
    BatchResponse,
    Embedding,
)

router = APIRouter(prefix="/v1", tags=["embeddings"])

VersionQuery = Annotated[
    str | None,
    Query(
        pattern=VERSION_REGEX,
        max_length=64,
        description="Version to read; the active version when omitted.",
        examples=["v1"],
    ),
]
AsQuery = Annotated[
    str | None,
    Query(
        alias="as",
        pattern=VERSION_REGEX,
        max_length=64,
        description="Map the embedding into this (possibly retired) version's space with the "
        "stored alignment; the body then names it as `version` and the one read as "
        "`aligned_from`.",
        examples=["v1"],
    ),
]
ALIGNED_FROM_HEADER = "X-Embedding-Aligned-From"
UserIdPath = Annotated[
    str, Path(pattern=USER_ID_REGEX, max_length=128, description="The user.", examples=["u42"])
]

_BINARY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
_BINARY_HEADERS = {
    VERSION_HEADER: {"description": "Version read.", "schema": {"type": "string"}},
    DIM_HEADER: {"description": "Vector length.", "schema": {"type": "integer"}},
    UPDATED_AT_HEADER: {"description": "Last write, unix seconds.", "schema": {"type": "number"}},
}
_READ_PROBLEMS = (
    UNAUTHENTICATED,
    FORBIDDEN,
    UNKNOWN_VERSION,
    RETIRED_VERSION,
    INVALID_REQUEST,
    NO_ACTIVE_VERSION,
    REDIS_UNAVAILABLE,
    CORRUPT_EMBEDDING,
)


@router.get(
    "/users/{user_id}/embedding",
    response_model=Embedding,
    responses={
        200: {
            "description": "The embedding. JSON by default; `Accept: application/octet-stream` "
            "gives the raw little-endian float32 vector and `Accept: application/x-npy` a "
            "NumPy `.npy` file; binary bodies carry version, dim and update time in headers.",
            "headers": _BINARY_HEADERS,
            "content": {OCTET_STREAM: _BINARY_SCHEMA, NPY: _BINARY_SCHEMA},
        },
        **problem_responses(UNKNOWN_USER, *_READ_PROBLEMS),
    },
)
async def read_embedding(
    user_id: UserIdPath,
    request: Request,
    reader: Reader,
    version: VersionQuery = None,
    as_: AsQuery = None,
) -> Response:
    """Read one user's embedding."""
    service = service_of(request)
    info = await service.resolve(version)
    metrics.tag_version(request, info.version)
    stored = await service.embedding(info, user_id)
    metrics.record_served(info.version, reader.name, 1)
    service.reads.count(info.version, reader.name)
    vector, served_as = stored.vector, info.version
    if as_ is not None:
        vector, served_as = (await service.alignment(info, as_)).apply(vector), as_
    aligned = {"aligned_from": info.version} if as_ is not None else {}
    media_type = negotiate(request.headers.get("accept") or JSON)
    if media_type != JSON:
        response = binary_embedding(
            vector, media_type, version=served_as, updated_at=stored.updated_at
        )
        response.headers.update({ALIGNED_FROM_HEADER: info.version} if aligned else {})
        return response
    body = {
        "user_id": user_id,
        "version": served_as,
        "dim": len(vector),
        "embedding": vector,
        "updated_at": stored.updated_at,
        **aligned,
    }
    return JSONBytesResponse(body, headers={"Vary": "Accept"})


@router.post(
    "/embeddings:batch",
    response_model=BatchResponse,
    responses=problem_responses(BATCH_TOO_LARGE, *_READ_PROBLEMS),
)
async def read_embeddings(batch: BatchRequest, request: Request, reader: Reader) -> Response:
    """Read many users' embeddings in request order, listing the ids that have none."""
    service = service_of(request)
    info = await service.resolve(batch.version)
    metrics.tag_version(request, info.version)
    found, missing = await service.embeddings(info, batch.user_ids)
    metrics.record_served(info.version, reader.name, len(found), len(missing))
    service.reads.count(info.version, reader.name, len(found))
    body = {
        "version": info.version,
        "dim": info.dim,
        "embeddings": [
            {"user_id": e.user_id, "embedding": e.vector, "updated_at": e.updated_at} for e in found
        ],
        "missing": missing,
    }
    return JSONBytesResponse(body)
