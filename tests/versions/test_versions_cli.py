"""`encoder-service versions …` against a real Valkey, through typer's runner."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from typer.testing import CliRunner

from encoder_service.registry import Registry, read_at_key, reads_key
from encoder_service.settings import get_settings
from encoder_service.versions_cli import app
from tests.api.conftest import publish

runner = CliRunner()


@pytest.fixture
def cli(
    redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.setenv("REDIS_URL", redis_url)
    get_settings.cache_clear()
    users = [f"u{i}" for i in range(50)]
    publish(redis_client, "v1", users, seed=0, promote=True)
    publish(redis_client, "v2", users, seed=1)
    yield
    get_settings.cache_clear()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.usefixtures("cli")
def test_lifecycle_from_the_command_line(redis_client: redis.Redis) -> None:
    code, out = _run("promote", "v2", "--by", "alice")
    assert code == 0 and "v2: active (by alice" in out
    code, out = _run("list")
    assert "* v2" in out and "deprecated" in out
    code, out = _run("rollback", "--by", "bob")
    assert code == 0 and out.startswith("v1: active (by bob")
    code, out = _run("show", "v2")
    assert [h["status"] for h in json.loads(out)["status_history"]] == [
        "shadow",
        "active",
        "deprecated",
    ]
    code, out = _run("retire", "v1")
    assert code == 2 and "promote another version first" in out


@pytest.mark.usefixtures("cli")
def test_retire_guard_names_the_readers(redis_client: redis.Redis) -> None:
    redis_client.hset(reads_key("v2"), "recs-team", 12)
    redis_client.hset(read_at_key("v2"), "recs-team", repr(time.time()))
    code, out = _run("readers", "v2")
    assert "recs-team" in out and "12 reads" in out
    code, out = _run("retire", "v2")
    assert code == 2 and "recs-team (12 reads" in out
    code, out = _run("retire", "v2", "--force")
    assert code == 0 and "v2: retired" in out
    assert Registry(redis_client).get("v2")["status"] == "retired"  # type: ignore[index]


@pytest.mark.usefixtures("cli")
def test_align_fits_and_stores_a_map(redis_client: redis.Redis) -> None:
    code, out = _run("align", "v2", "v1", "--kind", "ridge")
    assert code == 0 and "v2 -> v1 (ridge) on 50 users" in out
    assert Registry(redis_client).alignment("v2", "v1") is not None
    code, out = _run("align", "v2", "v9")
    assert code == 2 and "v9" in out
