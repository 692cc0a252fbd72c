"""The Redis layout of per-user data: keys, the embedding codec, bulk writes and reads.

Every key of one user carries the hash tag ``{<user_id>}`` so that a Redis Cluster keeps a
user's state and all of its embeddings on one slot, which lets the refresher commit them in one
MULTI/EXEC.

An embedding value is the raw vector, little-endian float32 (or float16) as the version's
manifest says, and nothing else: Valkey stores a 256-byte value in one 320-byte allocation, and
any header at all moves it to the next size class (measured: 319 vs 335 bytes per user, 1.25x vs
1.31x the raw vector). A value whose length does not match the manifest is refused as corrupt.
When a user was last re-encoded lives once per user, not per version, in ``meta:{<user_id>}``
(JSON ``{"updated_at": unix seconds, "last_ids": {stream key: last applied entry id}}``), written
by the refresher in the same transaction as the embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Literal, cast

import numpy as np
import orjson
import redis
import redis.asyncio

from encoder_service import cluster
from encoder_service.coalesce import CoalescingReader

EmbeddingDtype = Literal["float32", "float16"]

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_USER_ID_LINES = re.compile(rf"(?:{USER_ID_PATTERN.pattern}\n)*{USER_ID_PATTERN.pattern}")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

WRITE_BATCH = 4096
READ_BATCH = 10_000
SCAN_COUNT = 1000


class CorruptEmbeddingError(ValueError):
    """A stored value does not have the length its version's dim and dtype imply."""


class InvalidIdError(ValueError):
    """A user or version id would break the key layout (braces, glob characters, too long)."""


def validate_user_id(user_id: str) -> str:
    """Return ``user_id`` if it may appear in a key; braces would move the hash tag."""
    if not USER_ID_PATTERN.fullmatch(user_id):
        raise InvalidIdError(f"invalid user id {user_id!r}: must match {USER_ID_PATTERN.pattern}")
    return user_id


def validate_version(version: str) -> str:
    """Return ``version`` if it may appear in a key.

    No ``:`` and no glob characters, so that an ``emb:<version>:*`` scan never reaches another
    version's keys.
    """
    if not VERSION_PATTERN.fullmatch(version):
        raise InvalidIdError(f"invalid version {version!r}: must match {VERSION_PATTERN.pattern}")
    return version


def embedding_key(version: str, user_id: str) -> str:
    return f"emb:{validate_version(version)}:{{{validate_user_id(user_id)}}}"


def state_key(user_id: str) -> str:
    return f"state:{{{validate_user_id(user_id)}}}"


def _validate_user_ids(user_ids: Sequence[str]) -> None:
    """Validate a whole batch in one regex pass, several times faster than one call per id.

    One line per id is checked, and the line count proves that no id smuggled in a newline.
    """
    text = "\n".join(user_ids)
    if not (_USER_ID_LINES.fullmatch(text) and text.count("\n") == len(user_ids) - 1):
        for user_id in user_ids:
            validate_user_id(user_id)


def _embedding_keys(version: str, user_ids: Sequence[str]) -> list[str]:
    _validate_user_ids(user_ids)
    prefix = f"emb:{validate_version(version)}:"
    return [f"{prefix}{{{u}}}" for u in user_ids]


def _state_keys(user_ids: Sequence[str]) -> list[str]:
    _validate_user_ids(user_ids)
    return [f"state:{{{u}}}" for u in user_ids]


def _dtype(dtype: str) -> np.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown embedding dtype {dtype!r}; use one of {sorted(_DTYPES)}"
        ) from None


def encode_embeddings(matrix: np.ndarray, dtype: EmbeddingDtype = "float32") -> list[bytes]:
    """Encode each row of an ``(n, dim)`` matrix as one value.

    The rows are laid out in one numpy buffer and sliced, so the cost per user is one bytes
    slice, not a Python loop over floats.

    Raises:
        ValueError: a value is NaN or infinite once cast to ``dtype`` (float16 overflows above
            65504); such a vector would poison every consumer, so it is never stored.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"expected an (n, dim) matrix, got shape {matrix.shape}")
    with np.errstate(over="ignore"):
        vectors = np.ascontiguousarray(matrix, dtype=_dtype(dtype))
    if not np.isfinite(vectors).all():
        raise ValueError(f"embeddings hold NaN or infinity as {dtype} (float16 ends at 65504)")
    width = vectors.shape[1] * vectors.itemsize
    raw = vectors.tobytes()
    return [raw[i : i + width] for i in range(0, len(raw), width)]


def encode_embedding(vector: np.ndarray, dtype: EmbeddingDtype = "float32") -> bytes:
    """Encode one ``(dim,)`` vector; see :func:`encode_embeddings`."""
    return encode_embeddings(np.asarray(vector).reshape(1, -1), dtype)[0]


def decode_embedding(raw: bytes, dim: int, dtype: EmbeddingDtype = "float32") -> np.ndarray:
    """The vector as a fresh float32 ``(dim,)`` array.

    Raises:
        CorruptEmbeddingError: the length is not ``dim * itemsize``, e.g. a value written
            under another dim or dtype, or truncated; decoding it would return garbage.
    """
    dt = _dtype(dtype)
    expected = dim * dt.itemsize
    if len(raw) != expected:
        raise CorruptEmbeddingError(
            f"embedding value is {len(raw)} bytes, expected {expected} ({dim} x {dtype})"
        )
    return np.frombuffer(raw, dtype=dt, count=dim).astype(np.float32)


def decode_rows(
    raws: Sequence[bytes | None], dim: int, dtype: EmbeddingDtype = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Many values at once: a float32 ``(n, dim)`` matrix in ``raws`` order, and the found mask.

    Rows of absent values (None) are NaN, which no stored vector can be (writes refuse
    non-finite values), so the matrix alone still tells a reader which ids had no embedding.
    The found values are joined into one buffer and converted by one numpy call into the
    preallocated matrix: no Python object per user.

    Raises:
        CorruptEmbeddingError: naming the position of the first value of the wrong length.
    """
    dt = _dtype(dtype)
    expected = dim * dt.itemsize
    found = np.array([raw is not None for raw in raws], dtype=bool)
    hits = [raw for raw in raws if raw is not None]
    matrix = np.full((len(raws), dim), np.nan, dtype=np.float32)
    if hits and set(map(len, hits)) != {expected}:
        position, wrong = next(
            (i, raw) for i, raw in enumerate(raws) if raw is not None and len(raw) != expected
        )
        raise CorruptEmbeddingError(
            f"embedding value {position} is {len(wrong)} bytes, expected {expected} "
            f"({dim} x {dtype})"
        )
    if hits:
        matrix[found] = np.frombuffer(b"".join(hits), dtype=dt).reshape(len(hits), dim)
    return matrix, found


def meta_key(user_id: str) -> str:
    return f"meta:{{{validate_user_id(user_id)}}}"


def encode_meta(updated_at: float, last_ids: dict[str, str]) -> bytes:
    """The per-user refresh record: when it was last re-encoded and what it has applied."""
    return orjson.dumps({"updated_at": updated_at, "last_ids": last_ids})


def decode_meta(raw: bytes | None) -> tuple[float, dict[str, str]]:
    """``(updated_at, last_ids)``; a user never refreshed reads as ``(0.0, {})``."""
    if raw is None:
        return 0.0, {}
    data = orjson.loads(raw)
    return float(data["updated_at"]), dict(data["last_ids"])


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class EmbeddingStore:
    """Bulk writes and reads of embeddings and feature states over a sync client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _set_many(self, keys: Sequence[str], values: Sequence[bytes], batch_size: int) -> None:
        """One MSET per ``batch_size`` keys.

        About six times faster than pipelined SETs through redis-py (its per-command Python
        cost dominates; see benchmarks/store_bench.py). On a Redis Cluster each chunk is split
        into one MSET per slot.
        """
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        for key_chunk, value_chunk in zip(
            _chunks(keys, batch_size), _chunks(values, batch_size), strict=True
        ):
            cluster.mset(self.client, dict(zip(key_chunk, value_chunk, strict=True)))

    def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET in chunks (on a cluster, one MGET per slot of each chunk), in ``keys`` order."""
        values: list[bytes | None] = []
        for chunk in _chunks(keys, READ_BATCH):
            values.extend(cluster.mget(self.client, chunk))
        return values

    def write_embeddings(
        self,
        version: str,
        user_ids: Sequence[str],
        matrix: np.ndarray,
        *,
        dtype: EmbeddingDtype = "float32",
        batch_size: int = WRITE_BATCH,
    ) -> int:
        """Store row ``i`` of ``matrix`` as user ``user_ids[i]``'s embedding; returns the count.

        Not atomic across chunks: a failed publish leaves some users written, which
        :meth:`delete_version` cleans up.
        """
        if len(user_ids) != len(matrix):
            raise ValueError(f"{len(user_ids)} user ids but {len(matrix)} embeddings")
        values = encode_embeddings(matrix, dtype)
        self._set_many(_embedding_keys(version, user_ids), values, batch_size)
        return len(values)

    def write_states(
        self, user_ids: Sequence[str], blobs: Sequence[bytes], *, batch_size: int = WRITE_BATCH
    ) -> int:
        """Store each user's serialised feature state; returns the count."""
        self._set_many(_state_keys(user_ids), blobs, batch_size)
        return len(user_ids)

    def read_embeddings(self, version: str, user_ids: Sequence[str]) -> list[bytes | None]:
        """Raw values in ``user_ids`` order, None where a user has no embedding."""
        return self._get_many(_embedding_keys(version, user_ids))

    def read_states(self, user_ids: Sequence[str]) -> list[bytes | None]:
        return self._get_many(_state_keys(user_ids))

    def iter_state_users(self, match_count: int = SCAN_COUNT) -> Iterator[str]:
        """Every user with a stored state, in no order.

        SCAN semantics: a user present for the whole scan is yielded at least once, and may be
        yielded twice if the keyspace was resized meanwhile; consumers must be idempotent.
        """
        for key in self.client.scan_iter(match="state:{*}", count=match_count):
            yield key[len(b"state:{") : -1].decode()

    def _scan_version(self, version: str) -> Iterator[list[bytes]]:
        pattern = f"emb:{validate_version(version)}:*"
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
            batch.append(key)
            if len(batch) == SCAN_COUNT:
                yield batch
                batch = []
        if batch:
            yield batch

    def delete_version(self, version: str) -> int:
        """UNLINK every embedding of ``version`` (freed in the background); returns the count.

        O(keyspace) through SCAN: meant for cleaning a failed publish or retiring a version, not
        for a request path.
        """
        return sum(self.client.unlink(*batch) for batch in self._scan_version(version))

    def count_embeddings(self, version: str) -> int:
        """How many users have an embedding under ``version``; O(keyspace) through SCAN."""
        return sum(len(batch) for batch in self._scan_version(version))


class AsyncEmbeddingStore:
    """The read side the API needs, over an asyncio client.

    Single-user reads go through a :class:`CoalescingReader`, so that concurrent requests
    share one MGET instead of paying redis-py's per-command cost each.
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._reader = CoalescingReader(client)
        self._cluster = cluster.is_cluster(client)

    async def aclose(self) -> None:
        await self._reader.aclose()

    async def read_embedding(self, version: str, user_id: str) -> tuple[bytes | None, bytes | None]:
        """The raw embedding and the user's meta record, in one MGET (one slot, one trip)."""
        raw, meta = await self._reader.mget((embedding_key(version, user_id), meta_key(user_id)))
        return raw, meta

    async def read_batch(
        self, version: str, user_ids: Sequence[str], *, with_meta: bool = False
    ) -> tuple[list[bytes | None], list[bytes | None] | None]:
        """Raw embeddings in ``user_ids`` order (None where absent), and the users' meta records
        when ``with_meta``.

        Meta keys double the keys read and the values parsed, so they are read only when the
        caller wants per-user update times. The MGETs of all chunks go out in one pipeline: one
        round trip whatever the batch size, while no single command holds the server for long.
        On a cluster it is one MGET per slot, sent to every node at once.
        """
        keys = _embedding_keys(version, user_ids)
        if with_meta:
            keys += [f"meta:{{{u}}}" for u in user_ids]
        if not keys:
            return [], [] if with_meta else None
        if self._cluster:
            values = await cluster.mget_async(self.client, keys)
        elif len(keys) <= READ_BATCH:
            values = cast(list[bytes | None], await self.client.mget(keys))
        else:
            pipe = self.client.pipeline(transaction=False)
            for chunk in _chunks(keys, READ_BATCH):
                pipe.mget(chunk)
            values = [v for chunk_values in await pipe.execute() for v in chunk_values]
        n = len(user_ids)
        return values[:n], values[n:] if with_meta else None
