"""The command line: bad input stops with one line naming where; nothing is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from encoder_service.cli import app
from encoder_service.registry import Registry
from encoder_service.settings import get_settings

GOOD_EVENTS = "user_id,item_id,timestamp\nu1,i1,1700000000\nu2,i2,1700000100\n"


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ENCODER_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    ("events", "users", "expected"),
    [
        ("user_id,timestamp\nu1,1700000000\n", None, ["events.csv", "item_id"]),
        (
            "user_id,item_id,timestamp\nu1,i1,1700000000\nu2,i2,abc\n",
            None,
            ["events.csv", "row 2", "timestamp"],
        ),
        (GOOD_EVENTS, "user_id,age\nu1,30\n", ["events.csv", "row 2", "user_id", "u2"]),
        ("", None, ["events.csv", "empty"]),
        ("user_id,item_id,timestamp\n", None, ["events.csv"]),
    ],
    ids=["missing-column", "bad-timestamp", "unknown-user", "empty-file", "no-rows"],
)
def test_bad_input_is_one_line_naming_where_and_publishes_nothing(
    env: Path, redis_client: redis.Redis, events: str, users: str | None, expected: list[str]
) -> None:
    (env / "events.csv").write_text(events)
    args = ["train", "--events", str(env / "events.csv"), "--epochs", "1"]
    if users is not None:
        (env / "users.csv").write_text(users)
        args += ["--users", str(env / "users.csv")]
    result = _run(*args)
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in expected:
        assert fragment.lower() in message.lower(), (fragment, message)
    assert Registry(redis_client).list() == []


def test_no_source_is_a_usage_error(env: Path) -> None:
    result = _run("train")
    assert result.exit_code != 0
    assert "exactly one data source" in result.stderr


def test_every_command_has_help() -> None:
    for command in (
        ["--help"],
        ["demo", "--help"],
        ["train", "--help"],
        ["publish", "--help"],
        ["get", "--help"],
        ["serve", "--help"],
        ["keys", "new", "--help"],
        ["keys", "hash", "--help"],
        ["export", "--help"],
        ["import", "--help"],
        ["audit", "--help"],
        ["versions", "list", "--help"],
    ):
        result = _run(*command)
        assert result.exit_code == 0, command
        assert "Usage" in result.output


def test_keys_new_prints_a_key_whose_entry_authenticates_it() -> None:
    from encoder_service.api.auth import Authenticator, parse_api_keys

    result = _run("keys", "new", "recs", "--scope", "read", "--scope", "ingest")
    assert result.exit_code == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.output.splitlines())
    key, entry = lines["key"].strip(), lines["entry"].split()[0]
    principal = Authenticator(parse_api_keys(entry)).authenticate(key)
    assert principal.name == "recs" and principal.scopes == {"read", "ingest"}
    assert _run("keys", "new", "recs", "--scope", "root").exit_code != 0


def test_train_publishes_and_get_reads_back(env: Path, redis_client: redis.Redis) -> None:
    result = _run("train", "--synthetic", "150", "--epochs", "2", "--version", "v7")
    assert result.exit_code == 0, result.output + result.stderr
    assert "published 150 users as v7" in result.output
    assert Registry(redis_client).active() == "v7"
    got = _run("get", "u003")
    assert got.exit_code == 0, got.stderr
    assert "version v7 dim 64" in got.output
    listed = _run("versions", "list")
    assert "v7" in listed.output and "active" in listed.output


def test_item_settings_reach_the_trained_version(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items without content vectors get learned ones as wide as ENCODER_ITEM_VECTOR_DIM, and
    the manifest records the item-set weight and target the version was trained with."""
    rows = [
        f"u{u},i{(u * 7 + k) % 30},{1700000000 + 3600 * k}" for u in range(40) for k in range(6)
    ]
    (env / "events.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    monkeypatch.setenv("ENCODER_ITEM_VECTOR_DIM", "12")
    monkeypatch.setenv("ENCODER_ITEM_SET_WEIGHT", "7.5")
    monkeypatch.setenv("ENCODER_ITEM_SET_TARGET", "weight")
    monkeypatch.setenv("ENCODER_MAX_BRANCH_WIDTH", "24")
    get_settings.cache_clear()
    args = ["train", "--events", str(env / "events.csv"), "--epochs", "1", "--no-publish"]
    result = _run(*args, "--version", "wide")
    assert result.exit_code == 0, result.output + result.stderr
    manifest = json.loads((env / "home" / "models" / "wide" / "manifest.json").read_text())
    assert manifest["schema"]["item_vector_dim"] == 12
    assert manifest["training"]["item_set_weight"] == 7.5
    assert manifest["training"]["item_set_target"] == "weight"
    assert manifest["training"]["max_branch_width"] == 24
    taste = next(g for g in manifest["schema"]["groups"] if g["name"] == "item_taste")
    assert [s["end"] - s["start"] for s in taste["segments"]] == [12, 12, 12]
