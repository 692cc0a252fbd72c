"""How embeddings go on the wire: orjson-rendered JSON, raw float32, or ``.npy``.

Hot responses are rendered to bytes directly rather than through pydantic: validating a model
of a 64-float list per request costs more than the Redis round trip.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
NPY = "application/x-npy"
# In order of preference when the client accepts several equally.
EMBEDDING_MEDIA_TYPES = (JSON, OCTET_STREAM, NPY)

VERSION_HEADER = "X-Embedding-Version"
DIM_HEADER = "X-Embedding-Dim"
UPDATED_AT_HEADER = "X-Embedding-Updated-At"
ALIGNED_FROM_HEADER = "X-Embedding-Aligned-From"
COUNT_HEADER = "X-Embedding-Count"
MISSING_HEADER = "X-Embedding-Missing"
_FLOAT32_LE = np.dtype("<f4")


class JSONBytesResponse(Response):
    """JSON rendered by orjson; numpy arrays are written as lists without a Python loop."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _q(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


@lru_cache(maxsize=256)
def negotiate(accept: str) -> str:
    """The representation ``Accept`` prefers among :data:`EMBEDDING_MEDIA_TYPES`.

    The most specific matching range gives each type its q-value; JSON wins ties and is the
    answer when nothing offered is acceptable, since refusing with 406 helps no client. Cached
    because a client sends the same header on every request.
    """
    ranges: list[tuple[str, float]] = []
    for item in accept.split(","):
        media_range, *params = item.split(";")
        ranges.append((media_range.strip().lower(), _q(params)))
    best, best_q = JSON, 0.0
    for offer in EMBEDDING_MEDIA_TYPES:
        family = offer.split("/")[0] + "/*"
        quality = next(
            (q for pattern in (offer, family, "*/*") for r, q in ranges if r == pattern), 0.0
        )
        if quality > best_q:
            best, best_q = offer, quality
    return best


@lru_cache(maxsize=1024)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": _FLOAT32_LE.str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def binary_embedding(
    vector: np.ndarray, media_type: str, *, version: str, updated_at: float
) -> Response:
    """The vector as little-endian float32 bytes, raw or as an ``.npy`` file, with the version,
    dim and ``updated_at`` in headers since the body cannot carry them."""
    payload = vector.astype(_FLOAT32_LE, copy=False).tobytes()
    if media_type == NPY:
        payload = _npy_header((len(vector),)) + payload
    headers = {
        VERSION_HEADER: version,
        DIM_HEADER: str(len(vector)),
        UPDATED_AT_HEADER: repr(updated_at),
        "Vary": "Accept",
    }
    return Response(payload, media_type=media_type, headers=headers)


def binary_batch(
    matrix: np.ndarray,
    media_type: str,
    *,
    version: str,
    missing: int,
    updated_at: np.ndarray | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A batch as one little-endian float32 ``(n, dim)`` matrix in request order, NaN rows for
    ids without an embedding; raw or as an ``.npy`` file.

    The raw form appends the ``n`` update times as little-endian float64 when given (an ``.npy``
    file holds one array, so the route refuses that combination). Rendering is one buffer copy,
    whatever the batch size.
    """
    payload = np.ascontiguousarray(matrix, dtype=_FLOAT32_LE).tobytes()
    if media_type == NPY:
        payload = _npy_header(matrix.shape) + payload
    elif updated_at is not None:
        payload += updated_at.astype("<f8", copy=False).tobytes()
    return Response(
        payload,
        media_type=media_type,
        headers={
            VERSION_HEADER: version,
            DIM_HEADER: str(matrix.shape[1]),
            COUNT_HEADER: str(matrix.shape[0]),
            MISSING_HEADER: str(missing),
            "Vary": "Accept",
            **(headers or {}),
        },
    )
