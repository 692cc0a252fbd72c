"""What goes over the wire: request paths, and parsing answers into numpy and typed values.

Shared by the sync and the async client so both read the API identically.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from downstream_adapters.errors import AdapterError, VersionMismatchError, error_from_response

OCTET_STREAM = "application/octet-stream"
VERSION_HEADER = "x-embedding-version"
DIM_HEADER = "x-embedding-dim"
UPDATED_AT_HEADER = "x-embedding-updated-at"
COUNT_HEADER = "x-embedding-count"
MISSING_HEADER = "x-embedding-missing"


@dataclass(frozen=True)
class Pin:
    """What a head was trained on: the version id, the embedding length and the schema hash.

    A server that answers with anything else would feed the head vectors from another space.
    """

    version: str
    dim: int
    schema_hash: str

    def check(self, served: Pin) -> None:
        """Raise :class:`VersionMismatchError` naming every field that differs."""
        diffs = [
            f"{name}: trained on {mine!r}, server has {theirs!r}"
            for name, mine, theirs in (
                ("version", self.version, served.version),
                ("embedding_dim", self.dim, served.dim),
                ("schema_hash", self.schema_hash, served.schema_hash),
            )
            if mine != theirs
        ]
        if diffs:
            raise VersionMismatchError(
                "the server's embeddings are not the ones this adapter was trained on ("
                + "; ".join(diffs)
                + "); pin the client to the trained version or retrain the head on the new one"
            )


@dataclass(frozen=True)
class VersionInfo:
    """A version's manifest as the API serves it."""

    pin: Pin
    status: str
    manifest: dict[str, Any]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> VersionInfo:
        pin = Pin(
            str(manifest["version"]), int(manifest["embedding_dim"]), str(manifest["schema_hash"])
        )
        return cls(pin, str(manifest.get("status", "")), dict(manifest))


@dataclass
class Embeddings:
    """Vectors for requested users, in request order.

    ``vectors`` is ``[n, dim]`` float32; rows of users listed in ``missing`` are NaN, and
    ``found`` marks the others. ``updated_at`` holds unix seconds, NaN when missing, cached, or
    not asked for (``fetch(..., updated_at=True)``).
    """

    version: str
    user_ids: list[str]
    vectors: np.ndarray
    updated_at: np.ndarray
    missing: list[str] = field(default_factory=list)

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.vectors).any(axis=1) if self.vectors.size else np.zeros(0, bool)


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code >= 400:
        headers = {k.lower(): v for k, v in response.headers.items()}
        raise error_from_response(response.status_code, response.content, headers)


def embedding_path(user_id: str) -> str:
    return f"/v1/users/{quote(user_id, safe='')}/embedding"


def decode_binary(
    response: httpx.Response, expected_version: str | None
) -> tuple[np.ndarray, float]:
    """The raw little-endian float32 body, checked against its headers."""
    dim = int(response.headers[DIM_HEADER])
    version = response.headers[VERSION_HEADER]
    if expected_version is not None and version != expected_version:
        raise VersionMismatchError(f"asked for version {expected_version!r}, got {version!r}")
    vector = np.frombuffer(response.content, dtype="<f4").astype(np.float32)
    if vector.shape != (dim,):
        raise AdapterError(f"body holds {vector.size} floats but {DIM_HEADER} says {dim}")
    return vector, float(response.headers[UPDATED_AT_HEADER])


def chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def batch_body(user_ids: list[str], version: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"user_ids": user_ids}
    if version is not None:
        body["version"] = version
    return body


def batch_params(updated_at: bool) -> dict[str, str] | None:
    return {"updated_at": "true"} if updated_at else None


def parse_binary_batch(
    response: httpx.Response,
    user_ids: Sequence[str],
    version: str,
    dim: int,
    *,
    updated_at: bool,
) -> dict[str, tuple[np.ndarray, float]]:
    """``{user: (vector, updated_at)}`` of the found users of one binary batch answer.

    The body is one float32 ``(n, dim)`` matrix in request order with NaN rows for missing
    ids, then ``n`` float64 update times when asked for; every header is checked against the
    request, so a body from another version or of another shape is refused, never misread.
    """
    served = response.headers[VERSION_HEADER]
    if served != version:
        raise VersionMismatchError(f"asked for version {version!r}, got {served!r}")
    served_dim = int(response.headers[DIM_HEADER])
    if served_dim != dim:
        raise VersionMismatchError(f"expected {dim}-dim embeddings, the server sent {served_dim}")
    rows = len(user_ids)
    width = rows * dim * 4
    expected = width + (rows * 8 if updated_at else 0)
    if int(response.headers[COUNT_HEADER]) != rows or len(response.content) != expected:
        raise AdapterError(
            f"batch body of {len(response.content)} bytes for {response.headers[COUNT_HEADER]} "
            f"rows; expected {expected} bytes for {rows} ids of {dim} dims"
        )
    matrix = np.frombuffer(response.content, "<f4", count=rows * dim).reshape(rows, dim)
    matrix = matrix.astype(np.float32)
    found = ~np.isnan(matrix).all(axis=1)
    if rows - int(found.sum()) != int(response.headers[MISSING_HEADER]):
        raise AdapterError("the NaN rows of a batch body disagree with its missing count")
    stamps = (
        np.frombuffer(response.content, "<f8", offset=width).tolist()
        if updated_at
        else [float("nan")] * rows
    )
    return {
        user: (row, stamp)
        for user, row, stamp, hit in zip(user_ids, matrix, stamps, found.tolist(), strict=True)
        if hit
    }


def assemble(
    version: str,
    user_ids: Sequence[str],
    dim: int,
    found: Mapping[str, tuple[np.ndarray, float]],
) -> Embeddings:
    vectors = np.full((len(user_ids), dim), np.nan, dtype=np.float32)
    updated = np.full(len(user_ids), np.nan)
    missing = []
    for row, user in enumerate(user_ids):
        hit = found.get(user)
        if hit is None:
            missing.append(user)
        else:
            vectors[row], updated[row] = hit
    return Embeddings(version, list(user_ids), vectors, updated, missing)


def with_idempotency_keys(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Give each event lacking one an idempotency key, so a retried POST applies it once."""
    return [
        {**event, "idempotency_key": event.get("idempotency_key") or uuid.uuid4().hex}
        for event in events
    ]
