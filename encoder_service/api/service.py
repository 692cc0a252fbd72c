"""What the API does, free of HTTP: resolve a version, read and decode embeddings, list manifests.

Refusals are raised as :class:`ServiceError` subclasses; ``problems.py`` turns them into
problem+json responses. Redis errors propagate unchanged (the API answers them with 503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import redis.asyncio

from encoder_service.alignment import AlignmentMap
from encoder_service.api.reads import ReadTracker
from encoder_service.registry import AsyncRegistry
from encoder_service.store import (
    AsyncEmbeddingStore,
    CorruptEmbeddingError,
    EmbeddingDtype,
    decode_embedding,
    decode_meta,
    decode_rows,
)

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A refusal the caller can act on; ``context`` is echoed in the problem body."""

    def __init__(self, detail: str, **context: str | int) -> None:
        super().__init__(detail)
        self.context = context


class UnknownUserError(ServiceError):
    pass


class UnknownVersionError(ServiceError):
    pass


class RetiredVersionError(ServiceError):
    pass


class NoActiveVersionError(ServiceError):
    pass


class NoAlignmentError(UnknownVersionError):
    """``as=`` names a version no map from the read version leads to."""


class BatchTooLargeError(ServiceError):
    pass


class CorruptStoredEmbeddingError(ServiceError):
    pass


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What reading a version's embeddings needs from its manifest."""

    version: str
    dim: int
    dtype: EmbeddingDtype
    status: str
    published_at: float
    """Unix seconds the version was published: a user's ``updated_at`` is never older."""


@dataclass(frozen=True, slots=True)
class StoredEmbedding:
    user_id: str
    vector: np.ndarray  # float32, (dim,)
    updated_at: float


@dataclass(frozen=True, slots=True)
class BatchRead:
    """A batch in request order, as arrays: one row per requested id, NaN where none is stored.

    Arrays rather than an object per user: a batch of 1,000 then costs a few numpy calls to
    decode and to render, instead of thousands of Python objects to build and collect.
    """

    version: str
    """The version whose space the rows are in (the ``as=`` target when aligned)."""
    user_ids: Sequence[str]
    matrix: np.ndarray
    """float32, ``(n, dim)``; NaN rows where ``found`` is False."""
    found: np.ndarray
    """bool, ``(n,)``."""
    updated_at: np.ndarray | None
    """float64 unix seconds, ``(n,)``, NaN where not found; None unless asked for."""
    aligned_from: str | None = None
    """The version read, when the rows were mapped into another version's space."""

    @property
    def missing(self) -> list[str]:
        return [u for u, hit in zip(self.user_ids, self.found.tolist(), strict=True) if not hit]

    def aligned(self, mapping: AlignmentMap) -> BatchRead:
        """The found rows mapped into ``mapping.target``'s space; missing rows stay NaN."""
        matrix = np.full((len(self.matrix), mapping.weight.shape[1]), np.nan, dtype=np.float32)
        matrix[self.found] = mapping.apply(self.matrix[self.found])
        return BatchRead(
            mapping.target, self.user_ids, matrix, self.found, self.updated_at, self.version
        )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    active: str | None
    versions: dict[str, VersionInfo]
    expires_at: float


class VersionCache:
    """The registry's active pointer and manifests, re-read at most once per ``ttl`` seconds.

    Reading them per request would double the Redis round trips of a lookup. Concurrent
    requests finding the snapshot stale share one reload instead of each starting their own.
    """

    def __init__(self, registry: AsyncRegistry, ttl: float) -> None:
        self.registry = registry
        self.ttl = ttl
        self._snapshot: _Snapshot | None = None
        self._reload: asyncio.Future[_Snapshot] | None = None

    async def get(self) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() < snapshot.expires_at:
            return snapshot
        if self._reload is None:
            self._reload = asyncio.ensure_future(self._load())
            self._reload.add_done_callback(self._reloaded)
        # A cancelled request must not cancel the reload other requests wait for.
        return await asyncio.shield(self._reload)

    def invalidate(self) -> None:
        """Forget the snapshot: this process made a lifecycle change and must see it at once."""
        self._snapshot = None

    def _reloaded(self, future: asyncio.Future[_Snapshot]) -> None:
        self._reload = None
        if not future.cancelled() and future.exception() is None:
            self._snapshot = future.result()

    async def _load(self) -> _Snapshot:
        # Pointer first: versions are never deleted, so a version promoted between the two
        # reads is already in the list, and the active version always has its manifest.
        active = await self.registry.active()
        manifests = await self.registry.list()
        versions = {
            m["version"]: VersionInfo(
                m["version"], m["embedding_dim"], m["dtype"], m["status"], _published_at(m)
            )
            for m in manifests
        }
        return _Snapshot(active, versions, time.monotonic() + self.ttl)


class EmbeddingService:
    """Reads for the API over one pooled asyncio client."""

    def __init__(
        self, client: redis.asyncio.Redis, *, batch_limit: int, version_cache_ttl: float
    ) -> None:
        self.client = client
        self.batch_limit = batch_limit
        self.store = AsyncEmbeddingStore(client)
        self.registry = AsyncRegistry(client)
        self.versions = VersionCache(self.registry, version_cache_ttl)
        self.reads = ReadTracker(self.registry)
        self._alignments: dict[tuple[str, str], tuple[float, AlignmentMap]] = {}
        self._alignment_ttl = version_cache_ttl

    async def resolve(self, version: str | None) -> VersionInfo:
        """The version to read: ``version``, or the active one when None.

        Raises:
            UnknownVersionError, RetiredVersionError, NoActiveVersionError.
        """
        snapshot = await self.versions.get()
        if version is None:
            if snapshot.active is None:
                raise NoActiveVersionError("no version is active; name one with `version=`")
            version = snapshot.active
        info = snapshot.versions.get(version)
        if info is None:
            raise UnknownVersionError(f"version {version!r} is not registered", version=version)
        if info.status == "retired":
            raise RetiredVersionError(
                f"version {version!r} is retired and no longer served; pin a live version "
                "(GET /v1/versions lists them)",
                version=version,
            )
        return info

    def _decode(
        self, info: VersionInfo, user_id: str, raw: bytes, meta: bytes | None
    ) -> StoredEmbedding:
        try:
            vector = decode_embedding(raw, info.dim, info.dtype)
        except CorruptEmbeddingError as exc:
            log.error("user %r under version %r: %s", user_id, info.version, exc)
            raise CorruptStoredEmbeddingError(
                f"the stored embedding of user {user_id!r} under version {info.version!r} "
                "is unreadable",
                user_id=user_id,
                version=info.version,
            ) from exc
        refreshed_at, _ = decode_meta(meta)
        return StoredEmbedding(user_id, vector, max(info.published_at, refreshed_at))

    async def embedding(self, info: VersionInfo, user_id: str) -> StoredEmbedding:
        """One user's embedding; ``user_id`` must already match the store's id pattern.

        Raises:
            UnknownUserError: the user has no embedding under the version.
        """
        raw, meta = await self.store.read_embedding(info.version, user_id)
        if raw is None:
            raise UnknownUserError(
                f"user {user_id!r} has no embedding under version {info.version!r}",
                user_id=user_id,
                version=info.version,
            )
        return self._decode(info, user_id, raw, meta)

    async def batch(
        self, info: VersionInfo, user_ids: Sequence[str], *, with_updated_at: bool = False
    ) -> BatchRead:
        """The embeddings of ``user_ids`` in order; per-user update times only when asked, since
        they double the keys read.

        Raises:
            BatchTooLargeError: more ids than ``batch_limit``.
            CorruptStoredEmbeddingError: naming the first user whose value is unreadable.
        """
        if len(user_ids) > self.batch_limit:
            raise BatchTooLargeError(
                f"{len(user_ids)} ids in one batch; at most {self.batch_limit} are allowed",
                limit=self.batch_limit,
            )
        raws, metas = await self.store.read_batch(info.version, user_ids, with_meta=with_updated_at)
        try:
            matrix, found = decode_rows(raws, info.dim, info.dtype)
        except CorruptEmbeddingError:
            # Name the user: decode one by one, the first corrupt value raises with its id.
            for user_id, raw in zip(user_ids, raws, strict=True):
                if raw is not None:
                    self._decode(info, user_id, raw, None)
            raise
        updated_at = None
        if metas is not None:
            updated_at = np.array(
                [
                    max(info.published_at, decode_meta(meta)[0]) if hit else np.nan
                    for hit, meta in zip(found.tolist(), metas, strict=True)
                ],
                dtype=np.float64,
            )
        return BatchRead(info.version, user_ids, matrix, found, updated_at)

    async def alignment(self, info: VersionInfo, target: str) -> AlignmentMap:
        """The map from ``info``'s space to ``target``'s, cached like the version list.

        ``target`` may be retired: reading an old space from a live version is the point.

        Raises:
            NoAlignmentError: no map from ``info.version`` to ``target`` is stored.
        """
        key = (info.version, target)
        cached = self._alignments.get(key)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        fields = await self.registry.alignment(info.version, target)
        if fields is None:
            raise NoAlignmentError(
                f"no alignment from version {info.version!r} to {target!r}; an operator "
                f"creates one with `encoder-service versions align {info.version} {target}`",
                version=info.version,
            )
        mapping = AlignmentMap.from_fields(fields)
        self._alignments[key] = (time.monotonic() + self._alignment_ttl, mapping)
        return mapping

    async def manifests(self) -> tuple[str | None, list[dict[str, Any]]]:
        """The active version and every manifest, oldest first, read fresh from the registry."""
        return await self.registry.active(), await self.registry.list()

    async def manifest(self, version: str) -> dict[str, Any]:
        """One manifest, retired ones included (they stay documented after they stop serving)."""
        manifest = await self.registry.get(version)
        if manifest is None:
            raise UnknownVersionError(f"version {version!r} is not registered", version=version)
        return manifest

    async def active_version(self) -> str:
        """The active version, read fresh: readiness must see Redis as it is now.

        Raises:
            NoActiveVersionError: Redis answers but no version is active.
        """
        active = await self.registry.active()
        if active is None:
            raise NoActiveVersionError("Redis is reachable but no version is active")
        return active


def _published_at(manifest: dict[str, Any]) -> float:
    """When the version's embeddings were written; older manifests only have ``created_at``."""
    stamp = manifest.get("published_at") or manifest.get("created_at")
    return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0
