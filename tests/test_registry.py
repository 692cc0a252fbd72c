"""The version registry against a real server: registration, lifecycle, atomic promotion."""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio

from encoder_service.registry import (
    ACTIVE_KEY,
    VERSIONS_KEY,
    AsyncRegistry,
    InvalidManifestError,
    InvalidTransitionError,
    Registry,
    SchemaMismatchError,
    UnknownVersionError,
)
from encoder_service.store import InvalidIdError


def _manifest(version: str, schema_hash: str = "abc123", created_at: Any = None) -> dict:
    return {
        "version": version,
        "embedding_dim": 64,
        "dtype": "float32",
        "schema_hash": schema_hash,
        "created_at": created_at or f"2025-01-0{version[-1]}T00:00:00+00:00",
        "metrics": {"loss": 0.5},
    }


@pytest.fixture
def registry(redis_client: redis.Redis) -> Registry:
    return Registry(redis_client)


def _register(registry: Registry, *versions: str) -> None:
    for version in versions:
        registry.register(_manifest(version), b"onnx-" + version.encode(), b"catalog")


def test_register_starts_in_shadow_with_artefacts(registry: Registry) -> None:
    stored = registry.register({**_manifest("v1"), "status": "active"}, b"onnx", b"cat", by="ci")
    assert stored["status"] == "shadow"
    assert [(h["status"], h["by"]) for h in stored["status_history"]] == [("shadow", "ci")]
    assert registry.get("v1") == stored
    assert stored["metrics"] == {"loss": 0.5}
    assert registry.model_bytes("v1") == b"onnx"
    assert registry.catalog_bytes("v1") == b"cat"
    assert registry.active() is None


def test_register_is_idempotent_for_the_same_schema(registry: Registry) -> None:
    _register(registry, "v1")
    registry.promote("v1", by="ops")
    again = registry.register(_manifest("v1"), b"other-bytes", b"other-catalog")
    assert again["status"] == "active"
    assert again == registry.get("v1")
    assert registry.model_bytes("v1") == b"onnx-v1"


def test_register_refuses_another_schema_under_the_same_version(registry: Registry) -> None:
    _register(registry, "v1")
    with pytest.raises(SchemaMismatchError, match="'abc123'.*'def456'"):
        registry.register(_manifest("v1", schema_hash="def456"), b"x", b"y")
    assert registry.get("v1")["schema_hash"] == "abc123"  # type: ignore[index]


def test_register_refuses_bad_manifests(registry: Registry) -> None:
    with pytest.raises(InvalidManifestError, match="schema_hash"):
        registry.register(
            {k: v for k, v in _manifest("v1").items() if k != "schema_hash"}, b"", b""
        )
    with pytest.raises(InvalidManifestError, match="dtype"):
        registry.register({**_manifest("v1"), "dtype": "int8"}, b"", b"")
    with pytest.raises(InvalidIdError):
        registry.register(_manifest("v1:bad"), b"", b"")
    assert registry.list() == []


def test_unknown_versions(registry: Registry) -> None:
    assert registry.get("v9") is None
    for call in (
        lambda: registry.promote("v9", by="x"),
        lambda: registry.set_status("v9", "retired", by="x"),
        lambda: registry.model_bytes("v9"),
        lambda: registry.catalog_bytes("v9"),
    ):
        with pytest.raises(UnknownVersionError, match="v9"):
            call()


def test_list_is_sorted_by_created_at(registry: Registry) -> None:
    for version in ("v3", "v1", "v2"):
        registry.register(_manifest(version), b"", b"")
    assert [m["version"] for m in registry.list()] == ["v1", "v2", "v3"]


def test_promote_deprecates_the_previous_active_and_records_history(registry: Registry) -> None:
    _register(registry, "v1", "v2")
    registry.promote("v1", by="alice")
    promoted = registry.promote("v2", by="bob")
    assert registry.active() == "v2"
    assert promoted == registry.get("v2")
    assert promoted["status"] == "active"
    previous = registry.get("v1")
    assert previous is not None and previous["status"] == "deprecated"
    assert [(h["status"], h["by"]) for h in previous["status_history"]] == [
        ("shadow", "cli"),
        ("active", "alice"),
        ("deprecated", "bob"),
    ]
    registry.promote("v1", by="carol")  # rollback
    assert registry.active() == "v1"
    assert registry.get("v2")["status"] == "deprecated"  # type: ignore[index]


def test_promoting_the_active_version_again_changes_nothing(registry: Registry) -> None:
    _register(registry, "v1")
    first = registry.promote("v1", by="a")
    assert registry.promote("v1", by="b") == first == registry.get("v1")


def _snapshot(client: redis.Redis) -> tuple[bytes | None, dict[bytes, bytes]]:
    """The pointer and every manifest read in one MULTI/EXEC, i.e. at one instant."""
    with client.pipeline(transaction=True) as pipe:
        pipe.get(ACTIVE_KEY)
        pipe.hgetall(VERSIONS_KEY)
        active, manifests = pipe.execute()
    return active, manifests


def test_promotion_is_atomic_under_concurrency(redis_client: redis.Redis) -> None:
    registry = Registry(redis_client)
    versions = ["v1", "v2", "v3", "v4"]
    _register(registry, *versions)
    registry.promote("v1", by="init")
    errors: list[BaseException] = []

    def promoter(offset: int) -> None:
        try:
            for i in range(60):
                registry.promote(versions[(i + offset) % len(versions)], by=f"t{offset}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=promoter, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    snapshots = 0
    while any(t.is_alive() for t in threads) or snapshots < 20:
        active, manifests = _snapshot(redis_client)
        statuses = {v.decode(): orjson.loads(m)["status"] for v, m in manifests.items()}
        assert active is not None and active.decode() in statuses
        assert [v for v, s in statuses.items() if s == "active"] == [active.decode()]
        assert registry.get(registry.active() or "") is not None
        snapshots += 1
    for thread in threads:
        thread.join()
    assert errors == []


def test_retired_version_cannot_be_promoted(registry: Registry) -> None:
    _register(registry, "v1")
    registry.set_status("v1", "retired", by="ops")
    with pytest.raises(InvalidTransitionError, match="retired"):
        registry.promote("v1", by="ops")
    registry.set_status("v1", "shadow", by="ops")
    assert registry.promote("v1", by="ops")["status"] == "active"


def test_set_status_records_history_and_guards_the_active_version(registry: Registry) -> None:
    _register(registry, "v1", "v2")
    assert registry.set_status("v1", "active", by="ops")["status"] == "active"
    assert registry.active() == "v1"
    with pytest.raises(InvalidTransitionError, match="promote another version first"):
        registry.set_status("v1", "retired", by="ops")
    with pytest.raises(InvalidTransitionError, match="unknown status"):
        registry.set_status("v2", "gone", by="ops")
    registry.promote("v2", by="ops")
    retired = registry.set_status("v1", "retired", by="bob")
    assert [h["status"] for h in retired["status_history"]] == [
        "shadow",
        "active",
        "deprecated",
        "retired",
    ]
    assert retired["status_history"][-1]["by"] == "bob"
    assert registry.set_status("v1", "retired", by="again") == retired


async def test_async_registry_reads(
    registry: Registry, async_redis_client: redis.asyncio.Redis
) -> None:
    _register(registry, "v2", "v1")
    registry.promote("v2", by="ops")
    reader = AsyncRegistry(async_redis_client)
    assert await reader.active() == "v2"
    assert await reader.get("v2") == registry.get("v2")
    assert await reader.get("v7") is None
    assert [m["version"] for m in await reader.list()] == ["v1", "v2"]
