"""The version registry: manifests, lifecycle status and model artefacts, kept in Redis.

Living in Redis rather than on a local disk, the registry is the same truth for the API, the
refresher and the CLI, wherever they run. All its keys share the hash tag ``{registry}`` so that
a Redis Cluster keeps them on one slot and every change can be one MULTI/EXEC.

A version moves ``shadow -> active -> deprecated -> retired``; at most one version is
active, and the active pointer and the manifests change together, so a reader never sees an
active version without its manifest, or two active ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast, get_args

import orjson
import redis
import redis.asyncio
from redis.client import Pipeline

from encoder_service.store import validate_version

Status = Literal["shadow", "active", "deprecated", "retired"]
STATUSES: tuple[str, ...] = get_args(Status)
REQUIRED_FIELDS = ("version", "embedding_dim", "dtype", "schema_hash", "created_at")
DTYPES = ("float32", "float16")

VERSIONS_KEY = "{registry}:versions"
ACTIVE_KEY = "{registry}:active"

T = TypeVar("T")


def model_key(version: str) -> str:
    return f"{{registry}}:model:{validate_version(version)}"


def catalog_key(version: str) -> str:
    return f"{{registry}}:catalog:{validate_version(version)}"


class RegistryError(Exception):
    """Base of the registry's refusals."""


class UnknownVersionError(RegistryError, LookupError):
    def __init__(self, version: str) -> None:
        super().__init__(f"unknown version {version!r}")
        self.version = version


class SchemaMismatchError(RegistryError, ValueError):
    """The version id is taken by a model built for another feature schema."""


class InvalidManifestError(RegistryError, ValueError):
    pass


class InvalidTransitionError(RegistryError, ValueError):
    pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _load(raw: bytes | str | None) -> dict[str, Any] | None:
    return None if raw is None else orjson.loads(raw)


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _dump(manifest: dict[str, Any]) -> bytes:
    return orjson.dumps(manifest, option=orjson.OPT_SERIALIZE_NUMPY)


def _sorted(raws: Iterable[bytes | str]) -> list[dict[str, Any]]:
    """Manifests oldest first; ``created_at`` may be unix seconds or an ISO-8601 string."""

    def key(manifest: dict[str, Any]) -> tuple[str, str]:
        created = manifest["created_at"]
        if isinstance(created, int | float):
            created = datetime.fromtimestamp(created, UTC).isoformat()
        return str(created), manifest["version"]

    return sorted((orjson.loads(raw) for raw in raws), key=key)


def _with_status(manifest: dict[str, Any], status: str, by: str) -> dict[str, Any]:
    history = [*manifest.get("status_history", []), {"status": status, "at": _now(), "by": by}]
    return {**manifest, "status": status, "status_history": history}


def _validated(manifest: dict[str, Any]) -> dict[str, Any]:
    missing = [field for field in REQUIRED_FIELDS if field not in manifest]
    if missing:
        raise InvalidManifestError(f"manifest lacks {', '.join(missing)}")
    validate_version(manifest["version"])
    if manifest["dtype"] not in DTYPES:
        raise InvalidManifestError(f"dtype {manifest['dtype']!r} is not one of {DTYPES}")
    dim = manifest["embedding_dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InvalidManifestError(f"embedding_dim must be a positive integer, got {dim!r}")
    # The registry owns the lifecycle: whatever status the producer wrote is not trusted.
    return {k: v for k, v in manifest.items() if k not in ("status", "status_history")}


class Registry:
    """Registers versions and moves them through their lifecycle, over a sync client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _transaction(self, fn: Callable[[Pipeline], T], *watched: str) -> T:
        """Run ``fn`` under WATCH of ``watched`` and retry it if another writer got there first.

        ``fn`` reads in immediate mode, then calls ``pipe.multi()`` and queues its writes.
        """
        # redis-py types ``fn`` as returning None although it hands back its result.
        result = self.client.transaction(cast(Any, fn), *watched, value_from_callable=True)
        return cast(T, result)

    def register(
        self, manifest: dict[str, Any], model_bytes: bytes, catalog_bytes: bytes, *, by: str = "cli"
    ) -> dict[str, Any]:
        """Store a new version as ``shadow``, with its artefacts, in one MULTI/EXEC.

        Registering the same version with the same ``schema_hash`` again returns the stored
        manifest unchanged (its status included), so a retried publish is harmless.

        Raises:
            SchemaMismatchError: the version exists with another ``schema_hash``.
            InvalidManifestError: a required field is missing or invalid.
        """
        new = _with_status(_validated(manifest), "shadow", by)
        version = new["version"]

        def fn(pipe: Pipeline) -> dict[str, Any]:
            stored = _load(pipe.hget(VERSIONS_KEY, version))
            if stored is not None:
                if stored["schema_hash"] != new["schema_hash"]:
                    raise SchemaMismatchError(
                        f"version {version!r} is registered with schema hash "
                        f"{stored['schema_hash']!r}, not {new['schema_hash']!r}; "
                        "a changed feature schema needs a new version id"
                    )
                return stored
            pipe.multi()
            pipe.hset(VERSIONS_KEY, version, _dump(new))
            pipe.set(model_key(version), model_bytes)
            pipe.set(catalog_key(version), catalog_bytes)
            return new

        return self._transaction(fn, VERSIONS_KEY)

    def get(self, version: str) -> dict[str, Any] | None:
        return _load(self.client.hget(VERSIONS_KEY, validate_version(version)))

    def list(self) -> list[dict[str, Any]]:
        """Every version's manifest, oldest ``created_at`` first."""
        return _sorted(self.client.hvals(VERSIONS_KEY))

    def active(self) -> str | None:
        return _text(self.client.get(ACTIVE_KEY))

    def _require(self, pipe: Pipeline, version: str) -> dict[str, Any]:
        manifest = _load(pipe.hget(VERSIONS_KEY, validate_version(version)))
        if manifest is None:
            raise UnknownVersionError(version)
        return manifest

    def promote(self, version: str, *, by: str) -> dict[str, Any]:
        """Make ``version`` the active one; the previous active version becomes ``deprecated``.

        The pointer and both manifests change in one MULTI/EXEC under WATCH. Promoting the
        active version again changes nothing; promoting a deprecated one is the rollback.

        Raises:
            UnknownVersionError: no such version.
            InvalidTransitionError: the version is retired (no longer kept fresh).
        """

        def fn(pipe: Pipeline) -> dict[str, Any]:
            manifest = self._require(pipe, version)
            previous_id = _text(pipe.get(ACTIVE_KEY))
            if previous_id == version:
                return manifest
            if manifest["status"] == "retired":
                raise InvalidTransitionError(
                    f"version {version!r} is retired and no longer refreshed; set it to "
                    "'shadow' and refill it before promoting"
                )
            promoted = _with_status(manifest, "active", by)
            changes = [promoted]
            if previous_id is not None:
                changes.append(_with_status(self._require(pipe, previous_id), "deprecated", by))
            pipe.multi()
            for changed in changes:
                pipe.hset(VERSIONS_KEY, changed["version"], _dump(changed))
            pipe.set(ACTIVE_KEY, version)
            return promoted

        return self._transaction(fn, VERSIONS_KEY, ACTIVE_KEY)

    def set_status(self, version: str, status: str, *, by: str) -> dict[str, Any]:
        """Move ``version`` to ``status``; ``active`` goes through :meth:`promote`.

        Raises:
            UnknownVersionError: no such version.
            InvalidTransitionError: ``status`` is unknown, or ``version`` is the active one
                (promote another version first, so that some version is always active).
        """
        if status not in STATUSES:
            raise InvalidTransitionError(f"unknown status {status!r}; use one of {STATUSES}")
        if status == "active":
            return self.promote(version, by=by)

        def fn(pipe: Pipeline) -> dict[str, Any]:
            manifest = self._require(pipe, version)
            if _text(pipe.get(ACTIVE_KEY)) == version:
                raise InvalidTransitionError(
                    f"version {version!r} is active; promote another version first"
                )
            if manifest["status"] == status:
                return manifest
            changed = _with_status(manifest, status, by)
            pipe.multi()
            pipe.hset(VERSIONS_KEY, version, _dump(changed))
            return changed

        return self._transaction(fn, VERSIONS_KEY, ACTIVE_KEY)

    def _artefact(self, key: str, version: str) -> bytes:
        raw = self.client.get(key)
        if raw is None:
            raise UnknownVersionError(version)
        return cast(bytes, raw)

    def model_bytes(self, version: str) -> bytes:
        """The exported ONNX encoder of ``version``."""
        return self._artefact(model_key(version), version)

    def catalog_bytes(self, version: str) -> bytes:
        """The item catalogue ``version`` was trained with."""
        return self._artefact(catalog_key(version), version)


class AsyncRegistry:
    """The read side the API needs, over an asyncio client."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client

    async def get(self, version: str) -> dict[str, Any] | None:
        return _load(await self.client.hget(VERSIONS_KEY, validate_version(version)))

    async def list(self) -> list[dict[str, Any]]:
        """Every version's manifest, oldest ``created_at`` first."""
        return _sorted(await self.client.hvals(VERSIONS_KEY))

    async def active(self) -> str | None:
        return _text(await self.client.get(ACTIVE_KEY))
