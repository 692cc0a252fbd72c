"""Reading embeddings: one user (JSON or binary by ``Accept``), or a batch in request order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
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
    ALIGNED_FROM_HEADER,
    COUNT_HEADER,
    DIM_HEADER,
    JSON,
    MISSING_HEADER,
    NPY,
    OCTET_STREAM,
    UPDATED_AT_HEADER,
    VERSION_HEADER,
    JSONBytesResponse,
    binary_batch,
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
from encoder_service.api.service import BatchRead

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
UpdatedAtQuery = Annotated[
    bool,
    Query(
        description="Also return each user's `updated_at`. Off by default: it doubles the keys "
        "a batch reads. Not available with `Accept: application/x-npy`.",
    ),
]
UserIdPath = Annotated[
    str, Path(pattern=USER_ID_REGEX, max_length=128, description="The user.", examples=["u42"])
]

_BINARY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
_BINARY_HEADERS = {
    VERSION_HEADER: {"description": "Version read.", "schema": {"type": "string"}},
    DIM_HEADER: {"description": "Vector length.", "schema": {"type": "integer"}},
    UPDATED_AT_HEADER: {"description": "Last write, unix seconds.", "schema": {"type": "number"}},
    ALIGNED_FROM_HEADER: {
        "description": "With `as=`: the version read and mapped.",
        "schema": {"type": "string"},
    },
}
_BATCH_HEADERS = {
    VERSION_HEADER: {
        "description": "The version whose space the rows are in.",
        "schema": {"type": "string"},
    },
    DIM_HEADER: {"description": "Columns of the matrix.", "schema": {"type": "integer"}},
    COUNT_HEADER: {
        "description": "Rows of the matrix: the ids requested.",
        "schema": {"type": "integer"},
    },
    MISSING_HEADER: {
        "description": "How many ids have no embedding (their rows are NaN).",
        "schema": {"type": "integer"},
    },
    ALIGNED_FROM_HEADER: _BINARY_HEADERS[ALIGNED_FROM_HEADER],
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
    responses={
        200: {
            "description": "Found users in request order and the ids without an embedding. "
            "`Accept: application/octet-stream` gives one little-endian float32 matrix, one "
            "row per requested id in request order, NaN rows for ids without an embedding "
            "(stored vectors are never NaN), followed by one little-endian float64 "
            "`updated_at` per id when `updated_at=true`; `Accept: application/x-npy` gives "
            "the matrix as a NumPy `.npy` file. Binary bodies carry version, dim, row and "
            "missing counts in headers.",
            "headers": _BATCH_HEADERS,
            "content": {OCTET_STREAM: _BINARY_SCHEMA, NPY: _BINARY_SCHEMA},
        },
        **problem_responses(BATCH_TOO_LARGE, *_READ_PROBLEMS),
    },
)
async def read_embeddings(
    batch: BatchRequest,
    request: Request,
    reader: Reader,
    as_: AsQuery = None,
    updated_at: UpdatedAtQuery = False,
) -> Response:
    """Read many users' embeddings in request order, listing the ids that have none."""
    media_type = negotiate(request.headers.get("accept") or JSON)
    if media_type == NPY and updated_at:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "updated_at"),
                    "msg": "an .npy body holds only the matrix; ask for "
                    "application/octet-stream or JSON to get updated_at",
                    "type": "value_error",
                }
            ]
        )
    service = service_of(request)
    info = await service.resolve(batch.version)
    metrics.tag_version(request, info.version)
    # The map first: a missing one refuses the request before anything is read.
    mapping = await service.alignment(info, as_) if as_ is not None else None
    read = await service.batch(info, batch.user_ids, with_updated_at=updated_at)
    found = int(read.found.sum())
    metrics.record_served(info.version, reader.name, found, len(read.found) - found)
    service.reads.count(info.version, reader.name, found)
    if mapping is not None:
        read = read.aligned(mapping)
    if media_type != JSON:
        aligned = {ALIGNED_FROM_HEADER: read.aligned_from} if read.aligned_from else {}
        return binary_batch(
            read.matrix,
            media_type,
            version=read.version,
            missing=len(read.found) - found,
            updated_at=read.updated_at,
            headers=aligned,
        )
    return JSONBytesResponse(_batch_body(read), headers={"Vary": "Accept"})


def _batch_body(read: BatchRead) -> dict[str, object]:
    """The JSON answer; numpy rows go to orjson as they are, with no list of floats built."""
    hits = read.found.tolist()
    if read.updated_at is None:
        embeddings = [
            {"user_id": user_id, "embedding": row}
            for user_id, row, hit in zip(read.user_ids, read.matrix, hits, strict=True)
            if hit
        ]
    else:
        embeddings = [
            {"user_id": user_id, "embedding": row, "updated_at": at}
            for user_id, row, at, hit in zip(
                read.user_ids, read.matrix, read.updated_at.tolist(), hits, strict=True
            )
            if hit
        ]
    body: dict[str, object] = {
        "version": read.version,
        "dim": read.matrix.shape[1],
        "embeddings": embeddings,
        "missing": read.missing,
    }
    if read.aligned_from is not None:
        body["aligned_from"] = read.aligned_from
    return body
