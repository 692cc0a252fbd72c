"""Back up one version to Parquet files and restore it into any Redis, byte for byte.

A backup is a folder:

``users.parquet``
    One row per user: ``user_id`` and the raw bytes of its ``embedding`` (in this version),
    feature ``state`` and refresh ``meta``, each null where the user has none. The three values
    of a user come from one MGET, so they belong together even while the refresher runs.
``registry.parquet``
    ``key``, ``field``, ``value``: the version's manifest (status and history included), its ONNX
    model and item catalogue, and the alignment maps from it to other versions.
``backup.json``
    What was exported (version, counts, whether it was active) and the SHA-256 of each file.
    It is written last: a folder without it is an interrupted export, and import refuses it.

Both directions stream in chunks of SCAN and MGET (``chunk_size`` users) and write Parquet in
row groups of bounded size, so a million users never need to be in memory at once. Feature
states are shared by every version, so a backup carries the states of all users, and import
writes a user's state and meta only where the target has none (unless ``replace_states``):
a live target's newer states are never rolled back. Every value written is read back and
compared byte for byte, chunk by chunk, and the registry entries at the end.

An export taken while the refresher runs is a consistent copy of each user, not of the whole
keyspace at one instant (Redis has no such snapshot through SCAN); users created during the
export may be missing from it, and their events are still in the stream.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from encoder_service import __version__, cluster
from encoder_service.registry import (
    ACTIVE_KEY,
    VERSIONS_KEY,
    alignment_key,
    catalog_key,
    model_key,
)
from encoder_service.store import (
    SCAN_COUNT,
    EmbeddingStore,
    InvalidIdError,
    validate_user_id,
    validate_version,
)

FORMAT = "encoder-service-backup"
FORMAT_VERSION = 1
INFO_FILE = "backup.json"
USERS_FILE = "users.parquet"
REGISTRY_FILE = "registry.parquet"
ROW_GROUP_BYTES = 64 * 2**20
"""A row group is flushed at this many value bytes: the export's memory bound."""
_HASH_BLOCK = 2**20
_ITEMSIZE = {"float32": 4, "float16": 2}

_USERS_FIELDS: list[pa.Field] = [
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("embedding", pa.binary()),
    pa.field("state", pa.binary()),
    pa.field("meta", pa.binary()),
]
USERS_SCHEMA = pa.schema(_USERS_FIELDS)
_REGISTRY_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("field", pa.string()),
    pa.field("value", pa.binary(), nullable=False),
]
REGISTRY_SCHEMA = pa.schema(_REGISTRY_FIELDS)


class BackupError(ValueError):
    """A backup that cannot be written or restored: unknown version, damaged or foreign files,
    a version already present without ``force``, or values that did not read back equal."""


@dataclass(frozen=True)
class ExportReport:
    version: str
    folder: Path
    users: int
    embeddings: int
    states: int
    was_active: bool


@dataclass(frozen=True)
class ImportReport:
    version: str
    users: int
    embeddings: int
    states_written: int
    states_kept: int
    """Users whose state the target already had, left as they were."""
    status: str
    activated: bool
    replaced: bool = False
    notes: list[str] = field(default_factory=list)


# --- export -----------------------------------------------------------------------------------


def _user_id(key: bytes, prefix: bytes) -> str:
    return key[len(prefix) + 1 : -1].decode()


def _scan_users(client: redis.Redis, pattern: str, prefix: bytes, size: int) -> Iterator[list[str]]:
    """User ids of keys matching ``pattern`` (``<prefix>{<user>}``), ``size`` at a time."""
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=size):
        batch.append(_user_id(key, prefix))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_users(client: redis.Redis, version: str, users: Sequence[str]) -> list[list[Any]]:
    """``[embedding, state, meta]`` of each user, all from one MGET (one instant)."""
    keys: list[str] = []
    for user in users:
        keys += [f"emb:{version}:{{{user}}}", f"state:{{{user}}}", f"meta:{{{user}}}"]
    values = cluster.mget(client, keys)
    return [values[i : i + 3] for i in range(0, len(values), 3)]


class _RowGroupWriter:
    """Buffers rows and writes a Parquet row group whenever ``ROW_GROUP_BYTES`` accumulate."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.columns: list[list[Any]] = [[] for _ in schema.names]
        self.buffered = 0
        self.rows = 0

    def add(self, row: Sequence[Any]) -> None:
        for column, value in zip(self.columns, row, strict=True):
            column.append(value)
        self.buffered += sum(len(v) for v in row if v is not None)
        self.rows += 1
        if self.buffered >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.columns[0]:
            self.writer.write_table(pa.table(self.columns, schema=self.schema))
        self.columns = [[] for _ in self.schema.names]
        self.buffered = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _registry_rows(client: redis.Redis, version: str) -> list[tuple[str, str | None, bytes]]:
    manifest = client.hget(VERSIONS_KEY, version)
    if manifest is None:
        raise BackupError(f"unknown version {version!r}: nothing to export")
    rows: list[tuple[str, str | None, bytes]] = [(VERSIONS_KEY, version, cast(bytes, manifest))]
    for key in (model_key(version), catalog_key(version)):
        value = client.get(key)
        if value is not None:
            rows.append((key, None, cast(bytes, value)))
    prefix = alignment_key(version, "x")[:-1]
    for key in sorted(client.scan_iter(match=prefix + "*", count=SCAN_COUNT)):
        fields = cast(dict[bytes, bytes], client.hgetall(key))
        rows += [(key.decode(), f.decode(), v) for f, v in sorted(fields.items())]
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _prepare_folder(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; name a new one")
    folder.mkdir(parents=True, exist_ok=True)


def export_version(
    client: redis.Redis, version: str, folder: Path, *, chunk_size: int = SCAN_COUNT
) -> ExportReport:
    """Write ``version``'s users, states and registry entries to a new backup ``folder``.

    Raises:
        BackupError: no such version.
        FileExistsError: ``folder`` exists and is not empty (a backup is never overwritten).
    """
    validate_version(version)
    registry_rows = _registry_rows(client, version)
    _prepare_folder(folder)
    try:
        users = _RowGroupWriter(folder / USERS_FILE, USERS_SCHEMA)
        embeddings = states = 0
        # States first (every user the refresher knows), then this version's embeddings of users
        # without a state, so no user is written twice.
        for batch in _scan_users(client, "state:{*}", b"state:", chunk_size):
            for user, (emb, state, meta) in zip(
                batch, _read_users(client, version, batch), strict=True
            ):
                if state is None:
                    continue  # deleted since the scan saw it
                users.add((user, emb, state, meta))
                embeddings += emb is not None
                states += 1
        emb_prefix = f"emb:{version}:".encode()
        for batch in _scan_users(client, f"emb:{version}:*", emb_prefix, chunk_size):
            for user, (emb, state, meta) in zip(
                batch, _read_users(client, version, batch), strict=True
            ):
                if emb is not None and state is None:
                    users.add((user, emb, None, meta))
                    embeddings += 1
        users.close()
        registry = _RowGroupWriter(folder / REGISTRY_FILE, REGISTRY_SCHEMA)
        for row in registry_rows:
            registry.add(row)
        registry.close()
        was_active = client.get(ACTIVE_KEY) == version.encode()
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": version,
            "exported_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "encoder_service": __version__,
            "was_active": was_active,
            "users": users.rows,
            "embeddings": embeddings,
            "states": states,
            "files": {
                name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
                for name in (USERS_FILE, REGISTRY_FILE)
            },
        }
        (folder / INFO_FILE).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return ExportReport(version, folder, users.rows, embeddings, states, was_active)


# --- import -----------------------------------------------------------------------------------


def peek_version(folder: Path) -> str:
    """The version a backup folder claims to hold, unverified ("" if unreadable): for naming
    the target of an import before :func:`read_info` has checked anything."""
    try:
        return str(orjson.loads((folder / INFO_FILE).read_bytes())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def read_info(folder: Path) -> dict[str, Any]:
    """``backup.json``, after checking the format and every file's SHA-256.

    Raises:
        BackupError: not a complete backup, another format, or a file changed since export.
    """
    path = folder / INFO_FILE
    if not path.is_file():
        raise BackupError(f"{folder} holds no {INFO_FILE}: not a backup, or an interrupted one")
    info = orjson.loads(path.read_bytes())
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise BackupError(
            f"{path} is not an {FORMAT} of format version {FORMAT_VERSION} "
            f"(format {info.get('format')!r}, version {info.get('format_version')!r})"
        )
    validate_version(info["version"])
    for name, expected in info["files"].items():
        if name not in (USERS_FILE, REGISTRY_FILE):
            raise BackupError(f"{path} lists an unexpected file {name!r}")
        file = folder / name
        if not file.is_file():
            raise BackupError(f"{file} is missing")
        if _sha256(file) != expected["sha256"]:
            raise BackupError(f"{file} does not match its SHA-256 in {INFO_FILE}: damaged")
    return cast(dict[str, Any], info)


def _read_registry(folder: Path, version: str) -> list[tuple[str, str | None, bytes]]:
    """The registry rows, refusing any that would write outside ``version``'s own keys."""
    table = pq.read_table(folder / REGISTRY_FILE, schema=REGISTRY_SCHEMA)
    own = {model_key(version), catalog_key(version)}
    align_prefix = alignment_key(version, "x")[:-1]
    rows = list(zip(*(table.column(n).to_pylist() for n in REGISTRY_SCHEMA.names), strict=True))
    for position, (key, field_name, _) in enumerate(rows, 1):
        if key == VERSIONS_KEY and field_name == version:
            continue
        if key in own and field_name is None:
            continue
        if key.startswith(align_prefix) and field_name is not None:
            validate_version(key[len(align_prefix) :])
            continue
        raise BackupError(
            f"{REGISTRY_FILE} row {position} writes {key!r}, which is not version {version!r}'s"
        )
    manifests = [v for k, f, v in rows if k == VERSIONS_KEY]
    if len(manifests) != 1 or orjson.loads(manifests[0]).get("version") != version:
        raise BackupError(f"{REGISTRY_FILE} must hold exactly one manifest, of {version!r}")
    return rows


def _present(client: redis.Redis, version: str) -> bool:
    if client.hexists(VERSIONS_KEY, version):
        return True
    return (
        next(iter(client.scan_iter(match=f"emb:{version}:*", count=SCAN_COUNT)), None) is not None
    )


def _remove_version(client: redis.Redis, version: str) -> None:
    """What ``force`` replaces: the version's embeddings and registry entries."""
    EmbeddingStore(client).delete_version(version)
    align_keys = list(
        client.scan_iter(match=alignment_key(version, "x")[:-1] + "*", count=SCAN_COUNT)
    )
    with client.pipeline(transaction=True) as pipe:
        pipe.hdel(VERSIONS_KEY, version)
        pipe.delete(model_key(version), catalog_key(version), *align_keys)
        pipe.execute()


def _check_row(user: str | None, emb: bytes | None, width: int, position: int) -> None:
    if user is None:  # the column is declared non-null, but the file may not come from us
        raise BackupError(f"{USERS_FILE} row {position}: user_id is missing")
    try:
        validate_user_id(user)
    except InvalidIdError as exc:
        raise BackupError(f"{USERS_FILE} row {position}: {exc}") from exc
    if emb is not None and len(emb) != width:
        raise BackupError(
            f"{USERS_FILE} row {position} (user {user!r}): embedding is {len(emb)} bytes, "
            f"the manifest says {width}"
        )


@dataclass
class _UserCounts:
    users: int = 0
    embeddings: int = 0
    states_written: int = 0
    states_kept: int = 0


def _import_users(
    client: redis.Redis,
    folder: Path,
    version: str,
    width: int,
    *,
    chunk_size: int,
    replace_states: bool,
) -> _UserCounts:
    counts = _UserCounts()
    source = pq.ParquetFile(folder / USERS_FILE)
    for batch in source.iter_batches(batch_size=chunk_size):
        users, embs, states, metas = (batch.column(n).to_pylist() for n in USERS_SCHEMA.names)
        for offset, (user, emb) in enumerate(zip(users, embs, strict=True)):
            _check_row(user, emb, width, counts.users + offset + 1)
        existing: list[bytes | None] = [None] * len(users)
        if not replace_states:
            existing = cluster.mget(client, [f"state:{{{u}}}" for u in users])
        writes: dict[str, bytes] = {}
        for user, emb, state, meta, had in zip(users, embs, states, metas, existing, strict=True):
            if emb is not None:
                writes[f"emb:{version}:{{{user}}}"] = emb
            if state is None and meta is None:
                continue
            if had is not None:
                counts.states_kept += 1
                continue
            if state is not None:
                writes[f"state:{{{user}}}"] = state
                counts.states_written += 1
            if meta is not None:
                writes[f"meta:{{{user}}}"] = meta
        if writes:
            cluster.mset(client, writes)
            _verify(client, writes)
        counts.users += len(users)
        counts.embeddings += sum(e is not None for e in embs)
    return counts


def _verify(client: redis.Redis, written: dict[str, bytes]) -> None:
    """Read back every key just written and compare its bytes."""
    keys = list(written)
    for key, stored in zip(keys, cluster.mget(client, keys), strict=True):
        if stored != written[key]:
            raise BackupError(f"{key} did not read back as written: the import is not verified")


def _verify_registry(
    client: redis.Redis, rows: list[tuple[str, str | None, bytes]], manifest: bytes
) -> None:
    for key, field_name, value in rows:
        expected = manifest if key == VERSIONS_KEY else value
        stored = client.get(key) if field_name is None else client.hget(key, field_name)
        if stored != expected:
            where = key if field_name is None else f"{key} field {field_name!r}"
            raise BackupError(f"{where} did not read back as written: the import is not verified")


def _restored_manifest(raw: bytes, *, keep_status: bool, by: str, exported_at: str) -> bytes:
    """The manifest as exported, or (an active version the target cannot make active) moved to
    ``shadow`` with a history entry saying why."""
    if keep_status:
        return raw
    manifest = orjson.loads(raw)
    entry = {
        "status": "shadow",
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "by": by,
        "restored_from_backup": exported_at,
    }
    manifest["status"] = "shadow"
    manifest["status_history"] = [*manifest.get("status_history", []), entry]
    return orjson.dumps(manifest)


def import_version(
    client: redis.Redis,
    folder: Path,
    *,
    force: bool = False,
    replace_states: bool = False,
    by: str = "cli",
    chunk_size: int = SCAN_COUNT,
) -> ImportReport:
    """Restore the backup in ``folder`` into ``client``'s Redis and verify it byte for byte.

    The version becomes active if it was active when exported and the target has no active
    version; if the target has another one, an exported ``active`` manifest is restored as
    ``shadow`` (promote it to serve it). Users are written before the registry entries, so a
    reader never sees the version registered with users missing; a failure part-way removes
    the embeddings written so far.

    Raises:
        BackupError: the folder is not a sound backup, the version exists in the target
            (without ``force``), ``force`` would replace the target's active version, or a
            value did not read back equal.
    """
    info = read_info(folder)
    version = info["version"]
    rows = _read_registry(folder, version)
    manifest_raw = next(v for k, _, v in rows if k == VERSIONS_KEY)
    manifest = orjson.loads(manifest_raw)
    width = int(manifest["embedding_dim"]) * _ITEMSIZE[manifest["dtype"]]
    replaced = _present(client, version)
    if replaced:
        if not force:
            raise BackupError(
                f"version {version!r} already exists in the target; import with force to replace it"
            )
        if client.get(ACTIVE_KEY) == version.encode():
            raise BackupError(
                f"version {version!r} is the target's active version; promote another one "
                "before replacing it"
            )
        _remove_version(client, version)
    try:
        counts = _import_users(
            client, folder, version, width, chunk_size=chunk_size, replace_states=replace_states
        )
    except BaseException:
        EmbeddingStore(client).delete_version(version)
        raise
    activate = bool(info["was_active"]) and client.get(ACTIVE_KEY) is None
    keep_status = activate or manifest["status"] != "active"
    restored = _restored_manifest(
        manifest_raw, keep_status=keep_status, by=by, exported_at=info["exported_at"]
    )
    with client.pipeline(transaction=True) as pipe:
        for key, field_name, value in rows:
            if key == VERSIONS_KEY:
                pipe.hset(key, cast(str, field_name), restored)
            elif field_name is None:
                pipe.set(key, value)
            else:
                pipe.hset(key, field_name, value)
        if activate:
            pipe.set(ACTIVE_KEY, version)
        pipe.execute()
    _verify_registry(client, rows, restored)
    notes = []
    if not keep_status:
        notes.append("the target has another active version: restored as shadow")
    if counts.states_kept:
        notes.append(f"{counts.states_kept} users kept the target's own, newer state")
    return ImportReport(
        version=version,
        users=counts.users,
        embeddings=counts.embeddings,
        states_written=counts.states_written,
        states_kept=counts.states_kept,
        status=orjson.loads(restored)["status"],
        activated=activate,
        replaced=replaced,
        notes=notes,
    )
