"""The lifecycle on a real server: deprecate, retire with its reader guard, rollback, undo."""

from __future__ import annotations

import time

import pytest
import redis
import redis.asyncio

from encoder_service.registry import (
    AsyncRegistry,
    InvalidTransitionError,
    Registry,
    UnknownVersionError,
    VersionInUseError,
)


def _manifest(version: str) -> dict:
    return {
        "version": version,
        "embedding_dim": 8,
        "dtype": "float32",
        "schema_hash": "sha256:x",
        "created_at": f"2025-01-0{version[-1]}T00:00:00+00:00",
    }


@pytest.fixture
def registry(redis_client: redis.Redis) -> Registry:
    registry = Registry(redis_client)
    for version in ("v1", "v2", "v3"):
        registry.register(_manifest(version), b"", b"", by="ci")
    return registry


def test_rollback_returns_to_the_version_the_active_one_replaced(registry: Registry) -> None:
    registry.promote("v1", by="alice")
    registry.promote("v2", by="bob")
    registry.promote("v3", by="bob")
    back = registry.rollback(by="carol")
    assert back["version"] == "v2" and registry.active() == "v2"
    entry = back["status_history"][-1]
    assert entry["by"] == "carol" and entry["rollback_of"] == "v3" and entry["previous"] == "v3"
    assert registry.get("v3")["status"] == "deprecated"  # type: ignore[index]
    assert registry.rollback(by="carol")["version"] == "v3"  # a second rollback undoes it


def test_rollback_refuses_when_there_is_nothing_to_return_to(registry: Registry) -> None:
    with pytest.raises(InvalidTransitionError, match="nothing to roll back"):
        registry.rollback(by="ops")
    registry.promote("v1", by="ops")
    with pytest.raises(InvalidTransitionError, match="replaced no other version"):
        registry.rollback(by="ops")
    registry.promote("v2", by="ops")
    registry.retire("v1", by="ops")
    with pytest.raises(InvalidTransitionError, match="retired"):
        registry.rollback(by="ops")
    assert registry.active() == "v2"


def test_deprecate_keeps_serving_and_refuses_the_active_version(registry: Registry) -> None:
    registry.promote("v1", by="ops")
    assert registry.deprecate("v2", by="ops")["status"] == "deprecated"
    with pytest.raises(InvalidTransitionError, match="active"):
        registry.deprecate("v1", by="ops")
    with pytest.raises(UnknownVersionError):
        registry.deprecate("v9", by="ops")


async def test_retire_is_refused_while_readers_used_the_version_recently(
    async_redis_client: redis.asyncio.Redis, registry: Registry
) -> None:
    registry.promote("v1", by="ops")
    reader = AsyncRegistry(async_redis_client)
    now = time.time()
    await reader.record_reads({("v2", "recs-team"): 40, ("v2", "ads"): 2}, now - 30)
    await reader.record_reads({("v2", "recs-team"): 2}, now)
    await reader.record_reads({("v3", "old-job"): 5}, now - 10 * 86_400)
    with pytest.raises(VersionInUseError, match="recs-team \\(42 reads") as refused:
        registry.retire("v2", by="ops")
    assert [r.client for r in refused.value.readers] == ["recs-team", "ads"]
    assert registry.get("v2")["status"] == "shadow"  # type: ignore[index]
    # A read older than the window is not recent use.
    assert registry.retire("v3", by="ops")["status"] == "retired"
    with pytest.raises(VersionInUseError) as refused:
        registry.retire("v2", by="ops", recent_seconds=10)
    assert [r.client for r in refused.value.readers] == ["recs-team"]


async def test_forced_retire_records_whom_it_cut_off(
    async_redis_client: redis.asyncio.Redis, registry: Registry
) -> None:
    registry.promote("v1", by="ops")
    await AsyncRegistry(async_redis_client).record_reads({("v2", "recs-team"): 1}, time.time())
    retired = registry.retire("v2", by="ops", force=True)
    assert retired["status"] == "retired"
    assert retired["status_history"][-1]["forced_past"] == ["recs-team"]
    with pytest.raises(InvalidTransitionError, match="active"):
        registry.retire("v1", by="ops", force=True)


async def test_async_moves_follow_the_same_rules(
    async_redis_client: redis.asyncio.Redis, registry: Registry
) -> None:
    reader = AsyncRegistry(async_redis_client)
    await reader.promote("v1", by="api")
    await reader.promote("v2", by="api")
    assert (await reader.rollback(by="api"))["version"] == "v1"
    assert (await reader.deprecate("v3", by="api"))["status"] == "deprecated"
    await reader.record_reads({("v3", "etl"): 1}, time.time())
    with pytest.raises(VersionInUseError):
        await reader.retire("v3", by="api")
    assert registry.active() == "v1"


def test_unregister_undoes_a_shadow_version_only(registry: Registry) -> None:
    registry.promote("v1", by="ops")
    registry.unregister("v2")
    assert registry.get("v2") is None
    with pytest.raises(UnknownVersionError):
        registry.model_bytes("v2")
    with pytest.raises(InvalidTransitionError):
        registry.unregister("v1")


def test_alignment_fields_round_trip(registry: Registry) -> None:
    assert registry.alignment("v2", "v1") is None
    registry.set_alignment("v2", "v1", {"meta": b"{}", "weight": b"\x00" * 4})
    registry.set_alignment("v2", "v1", {"meta": b"{}", "weight": b"\x01" * 4})
    assert registry.alignment("v2", "v1") == {"meta": b"{}", "weight": b"\x01" * 4}
