"""The API's request and response bodies, as published in the OpenAPI document.

Request bodies are validated by these models. Responses are rendered straight to bytes (see
``responses.py``), so the response models only describe them; the fuzz tests check that the
two agree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from encoder_service.store import USER_ID_PATTERN, VERSION_PATTERN

USER_ID_REGEX = f"^{USER_ID_PATTERN.pattern}$"
VERSION_REGEX = f"^{VERSION_PATTERN.pattern}$"

UserId = Annotated[str, StringConstraints(pattern=USER_ID_REGEX, max_length=128)]
VersionId = Annotated[str, StringConstraints(pattern=VERSION_REGEX, max_length=64)]

_VECTOR_DOC = (
    "The vector as float32 values, printed shortest-round-trip: parse them as float32 to get "
    "the stored bits back exactly."
)


class Embedding(BaseModel):
    """One user's embedding under one version."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u42",
                    "version": "v1",
                    "dim": 4,
                    "embedding": [0.12, -0.5, 1.25, 0.0],
                    "updated_at": 1718000000.25,
                }
            ]
        }
    )

    user_id: str
    version: str
    dim: int = Field(description="Length of `embedding`.")
    embedding: list[float] = Field(description=_VECTOR_DOC)
    updated_at: float = Field(description="When the embedding was last written, unix seconds.")
    aligned_from: str | None = Field(
        default=None,
        description="With `as=`: the version read; `version` then names the space it was "
        "mapped into.",
    )


class BatchRequest(BaseModel):
    """Ids to look up; at most `ENCODER_BATCH_LIMIT` (default 1000) of them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_ids": ["u42", "u7", "nobody"], "version": "v1"}]},
    )

    user_ids: list[UserId] = Field(
        description="Users to look up, in the order the answer keeps; more than the configured "
        "batch limit (default 1000) is refused with 413."
    )
    version: VersionId | None = Field(
        default=None, description="Version to read; the active version when omitted."
    )


class BatchItem(BaseModel):
    """One found user of a batch."""

    user_id: str
    embedding: list[float] = Field(description=_VECTOR_DOC)
    updated_at: float | None = Field(
        default=None,
        description="When the embedding was last written, unix seconds; present only when "
        "the request asks for it with `updated_at=true`.",
    )


class BatchResponse(BaseModel):
    """Found users in request order, and the ids that have no embedding under the version."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "v1",
                    "dim": 2,
                    "embeddings": [
                        {"user_id": "u42", "embedding": [0.12, -0.5]},
                        {"user_id": "u7", "embedding": [0.3, 0.9]},
                    ],
                    "missing": ["nobody"],
                }
            ]
        }
    )

    version: str
    dim: int
    embeddings: list[BatchItem] = Field(description="One entry per found id, in request order.")
    missing: list[str] = Field(description="Ids without an embedding, in request order.")
    aligned_from: str | None = Field(
        default=None,
        description="With `as=`: the version read; `version` then names the space the "
        "embeddings were mapped into.",
    )


class StatusChange(BaseModel):
    status: str
    at: str = Field(description="ISO-8601 time of the change.")
    by: str = Field(description="Who made the change.")


class VersionManifest(BaseModel):
    """A version's manifest; producers may add fields beyond these."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "version": "v1",
                    "embedding_dim": 64,
                    "dtype": "float32",
                    "schema_hash": "3f2a9c0d1e7b",
                    "status": "active",
                    "status_history": [
                        {"status": "shadow", "at": "2024-06-10T08:00:00+00:00", "by": "cli"},
                        {"status": "active", "at": "2024-06-10T09:00:00+00:00", "by": "ops"},
                    ],
                    "created_at": "2024-06-10T07:55:00+00:00",
                    "metrics": {"reconstruction_loss": 0.071},
                }
            ]
        },
    )

    version: str
    embedding_dim: int
    dtype: Literal["float32", "float16"] = Field(description="How the embeddings are stored.")
    schema_hash: str = Field(description="Hash of the feature schema the encoder was built for.")
    status: Literal["shadow", "active", "deprecated", "retired"]
    status_history: list[StatusChange] = []
    created_at: str | float = Field(description="ISO-8601 string or unix seconds.")
    metrics: dict[str, Any] = {}


class VersionList(BaseModel):
    """Every registered version, oldest first."""

    active: str | None = Field(description="The version reads use when they name none.")
    versions: list[VersionManifest]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    active_version: str


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="Where in the request: path, query, body, ...")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem; clients branch on `type`, a stable URN per kind of problem."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:encoder-service:problem:unknown-user",
                    "title": "Unknown user",
                    "status": 404,
                    "detail": "user 'u42' has no embedding under version 'v1'",
                    "instance": "/v1/users/u42/embedding",
                    "user_id": "u42",
                    "version": "v1",
                }
            ]
        },
    )

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[ValidationIssue] | None = Field(
        default=None, description="For `invalid-request`: what was wrong, field by field."
    )
