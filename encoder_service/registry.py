"""The version registry: manifests, lifecycle status, read tracking, alignment maps, in Redis.

Living in Redis rather than on a local disk, the registry is the same truth for the API, the
refresher and the CLI, wherever they run. All its keys share the hash tag ``{registry}`` so that
a Redis Cluster keeps them on one slot and every change can be one MULTI/EXEC.

A version moves ``shadow -> active -> deprecated -> retired``; at most one version is
active, and the active pointer and the manifests change together, so a reader never sees an
active version without its manifest, or two active ones. Each transition is planned by a pure
function of the manifests and the pointer, and run under WATCH by a sync (CLI, publish) or an
asyncio (API) executor, so that both sides obey exactly the same rules.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast, get_args

import orjson
import redis
import redis.asyncio
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from encoder_service.store import validate_version

Status = Literal["shadow", "active", "deprecated", "retired"]
STATUSES: tuple[str, ...] = get_args(Status)
REQUIRED_FIELDS = ("version", "embedding_dim", "dtype", "schema_hash", "created_at")
DTYPES = ("float32", "float16")
RECENT_READ_SECONDS = 7 * 86_400
"""A version read within this window has live readers, and retiring it needs ``force``."""

VERSIONS_KEY = "{registry}:versions"
ACTIVE_KEY = "{registry}:active"

T = TypeVar("T")


def model_key(version: str) -> str:
    return f"{{registry}}:model:{validate_version(version)}"


def catalog_key(version: str) -> str:
    return f"{{registry}}:catalog:{validate_version(version)}"


def reads_key(version: str) -> str:
    """Hash: API key name -> embeddings of ``version`` it has read (HINCRBY by the API)."""
    return f"{{registry}}:reads:{validate_version(version)}"


def read_at_key(version: str) -> str:
    """Hash: API key name -> unix seconds of its latest read of ``version``."""
    return f"{{registry}}:read-at:{validate_version(version)}"


def alignment_key(source: str, target: str) -> str:
    """Hash holding the map from ``source``'s embedding space to ``target``'s."""
    return f"{{registry}}:align:{validate_version(source)}:{validate_version(target)}"


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


@dataclass(frozen=True, slots=True)
class ReaderUsage:
    """One API key's reads of a version: how many embeddings, and when it last read one."""

    client: str
    reads: int
    last_read_at: float


class VersionInUseError(RegistryError):
    """Retiring a version that downstream readers used recently, without ``force``."""

    def __init__(self, version: str, readers: list[ReaderUsage]) -> None:
        names = ", ".join(
            f"{r.client} ({r.reads} reads, last {_iso(r.last_read_at)})" for r in readers
        )
        super().__init__(
            f"version {version!r} was read recently by {names}; move those readers to another "
            "version first, or retire with force"
        )
        self.version = version
        self.readers = readers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


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


def _with_status(manifest: dict[str, Any], status: str, by: str, **note: Any) -> dict[str, Any]:
    entry = {"status": status, "at": _now(), "by": by, **note}
    history = [*manifest.get("status_history", []), entry]
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


# --- transitions: pure plans over (manifests, active pointer) ---------------------------------


@dataclass(frozen=True, slots=True)
class _Change:
    """What a transition writes: changed manifests and, if it moves, the new active pointer."""

    result: dict[str, Any]
    writes: tuple[dict[str, Any], ...] = ()
    active: str | None = None


Plan = Callable[[dict[str, dict[str, Any]], str | None], _Change]


def _require(manifests: Mapping[str, dict[str, Any]], version: str) -> dict[str, Any]:
    manifest = manifests.get(validate_version(version))
    if manifest is None:
        raise UnknownVersionError(version)
    return manifest


def _promote(version: str, by: str, **note: Any) -> Plan:
    """Make ``version`` active and the previous active one ``deprecated``.

    The new history entry names the version it replaced (``previous``), which is what a
    rollback returns to.
    """

    def plan(manifests: dict[str, dict[str, Any]], active: str | None) -> _Change:
        manifest = _require(manifests, version)
        if active == version:
            return _Change(manifest)
        if manifest["status"] == "retired":
            raise InvalidTransitionError(
                f"version {version!r} is retired and no longer refreshed; set it to "
                "'shadow' and refill it before promoting"
            )
        promoted = _with_status(manifest, "active", by, previous=active, **note)
        writes = [promoted]
        if active is not None:
            writes.append(_with_status(_require(manifests, active), "deprecated", by))
        return _Change(promoted, tuple(writes), version)

    return plan


def _rollback(by: str) -> Plan:
    """Promote again the version the active one replaced."""

    def plan(manifests: dict[str, dict[str, Any]], active: str | None) -> _Change:
        if active is None:
            raise InvalidTransitionError("no version is active; there is nothing to roll back")
        history = _require(manifests, active)["status_history"]
        entries = [h for h in history if h["status"] == "active"]
        previous = entries[-1].get("previous") if entries else None
        if previous is None:
            raise InvalidTransitionError(
                f"version {active!r} replaced no other version; promote one explicitly"
            )
        return _promote(previous, by, rollback_of=active)(manifests, active)

    return plan


def _set_status(version: str, status: str, by: str, **note: Any) -> Plan:
    def plan(manifests: dict[str, dict[str, Any]], active: str | None) -> _Change:
        manifest = _require(manifests, version)
        if active == version:
            raise InvalidTransitionError(
                f"version {version!r} is active; promote another version first"
            )
        if manifest["status"] == status:
            return _Change(manifest)
        changed = _with_status(manifest, status, by, **note)
        return _Change(changed, (changed,))

    return plan


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidTransitionError(f"unknown status {status!r}; use one of {STATUSES}")


# The clients never decode replies (decode_responses=False in redis_connection), so a hash comes
# back with bytes keys and values; redis-py's reply types also cover decoding clients.
_BytesHash = Mapping[bytes, bytes]


def _manifests(raw: _BytesHash) -> dict[str, dict[str, Any]]:
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


def _queue(pipe: Any, change: _Change) -> None:
    for changed in change.writes:
        pipe.hset(VERSIONS_KEY, changed["version"], _dump(changed))
    if change.active is not None:
        pipe.set(ACTIVE_KEY, change.active)


def _readers(
    counts: Mapping[bytes, bytes], read_at: Mapping[bytes, bytes], since: float = 0.0
) -> list[ReaderUsage]:
    """Readers whose latest read is at or after ``since``, most recent first."""
    usage = [
        ReaderUsage(name.decode(), int(counts.get(name, 0)), float(at))
        for name, at in read_at.items()
        if float(at) >= since
    ]
    return sorted(usage, key=lambda r: r.last_read_at, reverse=True)


def _decode_fields(raw: _BytesHash) -> dict[str, bytes] | None:
    return {k.decode(): v for k, v in raw.items()} or None


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

    def _apply(self, plan: Plan) -> dict[str, Any]:
        def fn(pipe: Pipeline) -> dict[str, Any]:
            change = plan(
                _manifests(cast(_BytesHash, pipe.hgetall(VERSIONS_KEY))),
                _text(pipe.get(ACTIVE_KEY)),
            )
            pipe.multi()
            _queue(pipe, change)
            return change.result

        return self._transaction(fn, VERSIONS_KEY, ACTIVE_KEY)

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

    def unregister(self, version: str) -> None:
        """Remove a ``shadow`` version's manifest and artefacts: undo a publish that failed.

        Raises:
            InvalidTransitionError: the version is not ``shadow`` (someone may rely on it).
        """

        def fn(pipe: Pipeline) -> None:
            manifest = _load(pipe.hget(VERSIONS_KEY, validate_version(version)))
            if manifest is None:
                return
            if manifest["status"] != "shadow":
                raise InvalidTransitionError(f"version {version!r} is {manifest['status']}")
            pipe.multi()
            pipe.hdel(VERSIONS_KEY, version)
            pipe.delete(model_key(version), catalog_key(version))

        self._transaction(fn, VERSIONS_KEY, ACTIVE_KEY)

    def get(self, version: str) -> dict[str, Any] | None:
        return _load(self.client.hget(VERSIONS_KEY, validate_version(version)))

    def list(self) -> list[dict[str, Any]]:
        """Every version's manifest, oldest ``created_at`` first."""
        return _sorted(self.client.hvals(VERSIONS_KEY))

    def active(self) -> str | None:
        return _text(self.client.get(ACTIVE_KEY))

    def promote(self, version: str, *, by: str) -> dict[str, Any]:
        """Make ``version`` the active one; the previous active version becomes ``deprecated``.

        The pointer and both manifests change in one MULTI/EXEC under WATCH. Promoting the
        active version again changes nothing; promoting a deprecated one is a rollback.

        Raises:
            UnknownVersionError: no such version.
            InvalidTransitionError: the version is retired (no longer kept fresh).
        """
        return self._apply(_promote(version, by))

    def rollback(self, *, by: str) -> dict[str, Any]:
        """Promote again the version the active one replaced, atomically; returns its manifest.

        Raises:
            InvalidTransitionError: nothing is active, the active version replaced none, or
                the one it replaced has been retired since.
        """
        return self._apply(_rollback(by))

    def set_status(self, version: str, status: str, *, by: str) -> dict[str, Any]:
        """Move ``version`` to ``status``; ``active`` goes through :meth:`promote`.

        The low-level move: :meth:`retire` adds the guard against retiring a version that is
        still read, and is what the CLI and the API use.

        Raises:
            UnknownVersionError: no such version.
            InvalidTransitionError: ``status`` is unknown, or ``version`` is the active one
                (promote another version first, so that some version is always active).
        """
        _check_status(status)
        if status == "active":
            return self.promote(version, by=by)
        return self._apply(_set_status(version, status, by))

    def deprecate(self, version: str, *, by: str) -> dict[str, Any]:
        """Mark ``version`` as on its way out: still refreshed and served, no longer promoted."""
        return self.set_status(version, "deprecated", by=by)

    def retire(
        self,
        version: str,
        *,
        by: str,
        force: bool = False,
        recent_seconds: float = RECENT_READ_SECONDS,
    ) -> dict[str, Any]:
        """Stop refreshing and serving ``version``, unless downstream readers still use it.

        Raises:
            VersionInUseError: an API key read it within ``recent_seconds`` and not ``force``;
                the error names who. With ``force`` the history records who was cut off.
            UnknownVersionError, InvalidTransitionError: as :meth:`set_status`.
        """
        readers = self.readers(version, since=time.time() - recent_seconds)
        if readers and not force:
            raise VersionInUseError(version, readers)
        note = {"forced_past": [r.client for r in readers]} if readers else {}
        return self._apply(_set_status(version, "retired", by, **note))

    def readers(self, version: str, *, since: float = 0.0) -> builtins.list[ReaderUsage]:
        """API keys that read ``version`` at or after ``since`` (unix seconds), latest first."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(reads_key(version))
            pipe.hgetall(read_at_key(version))
            counts, read_at = pipe.execute()
        return _readers(counts, read_at, since)

    def set_alignment(self, source: str, target: str, fields: Mapping[str, bytes]) -> None:
        """Store the map from ``source``'s space to ``target``'s, replacing any previous one."""
        key = alignment_key(source, target)
        mapping: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.execute()

    def alignment(self, source: str, target: str) -> dict[str, bytes] | None:
        """The stored fields of the ``source`` -> ``target`` map, or None."""
        return _decode_fields(cast(_BytesHash, self.client.hgetall(alignment_key(source, target))))

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
    """What the API needs, over an asyncio client: reads, lifecycle moves, read tracking."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client

    async def get(self, version: str) -> dict[str, Any] | None:
        return _load(await self.client.hget(VERSIONS_KEY, validate_version(version)))

    async def list(self) -> list[dict[str, Any]]:
        """Every version's manifest, oldest ``created_at`` first."""
        return _sorted(await self.client.hvals(VERSIONS_KEY))

    async def active(self) -> str | None:
        return _text(await self.client.get(ACTIVE_KEY))

    async def _apply(self, plan: Plan) -> dict[str, Any]:
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(VERSIONS_KEY, ACTIVE_KEY)
                    manifests = _manifests(cast(_BytesHash, await pipe.hgetall(VERSIONS_KEY)))
                    change = plan(manifests, _text(await pipe.get(ACTIVE_KEY)))
                    pipe.multi()
                    _queue(pipe, change)
                    await pipe.execute()
                    return change.result
                except redis.WatchError:
                    await pipe.reset()

    async def promote(self, version: str, *, by: str) -> dict[str, Any]:
        """See :meth:`Registry.promote`."""
        return await self._apply(_promote(version, by))

    async def rollback(self, *, by: str) -> dict[str, Any]:
        """See :meth:`Registry.rollback`."""
        return await self._apply(_rollback(by))

    async def deprecate(self, version: str, *, by: str) -> dict[str, Any]:
        """See :meth:`Registry.deprecate`."""
        return await self._apply(_set_status(version, "deprecated", by))

    async def retire(
        self,
        version: str,
        *,
        by: str,
        force: bool = False,
        recent_seconds: float = RECENT_READ_SECONDS,
    ) -> dict[str, Any]:
        """See :meth:`Registry.retire`."""
        readers = await self.readers(version, since=time.time() - recent_seconds)
        if readers and not force:
            raise VersionInUseError(version, readers)
        note = {"forced_past": [r.client for r in readers]} if readers else {}
        return await self._apply(_set_status(version, "retired", by, **note))

    async def readers(self, version: str, *, since: float = 0.0) -> builtins.list[ReaderUsage]:
        """See :meth:`Registry.readers`."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(reads_key(version))
            pipe.hgetall(read_at_key(version))
            counts, read_at = await pipe.execute()
        return _readers(counts, read_at, since)

    async def record_reads(self, counts: Mapping[tuple[str, str], int], at: float) -> None:
        """Add ``(version, client) -> n`` read counts and stamp each client's latest read."""
        if not counts:
            return
        pipe = self.client.pipeline(transaction=False)
        for (version, client), n in counts.items():
            pipe.hincrby(reads_key(version), client, n)
            pipe.hset(read_at_key(version), client, repr(at))
        await pipe.execute()

    async def alignment(self, source: str, target: str) -> dict[str, bytes] | None:
        """See :meth:`Registry.alignment`."""
        return _decode_fields(
            cast(_BytesHash, await self.client.hgetall(alignment_key(source, target)))
        )
