"""API keys: salted entries, the older unsalted form still honoured, rotation without a restart
(keys file re-read on change, SIGHUP in a real server process), and keys never in the logs."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from encoder_service.api.app import create_app
from encoder_service.api.auth import (
    AuthenticationError,
    Authenticator,
    api_key_entry,
    hash_api_key,
    new_api_key,
    parse_api_keys,
)
from encoder_service.cli import app as cli
from tests.api.conftest import Catalog, api_client, make_settings
from tests.conftest import REPO_ROOT


def test_entries_are_salted_so_one_key_never_hashes_alike_twice() -> None:
    key, entry = new_api_key("recs", ["read"])
    again = api_key_entry("recs", ["read"], key)
    name, scopes, salt, digest = entry.split(":")
    assert (name, scopes, len(salt), len(digest)) == ("recs", "read", 32, 64)
    assert entry != again and salt != again.split(":")[2]
    assert digest != hashlib.sha256(key.encode()).hexdigest()
    assert key not in entry
    for text in (entry, again):
        authenticator = Authenticator(parse_api_keys(text))
        assert authenticator.authenticate(key).name == "recs"
        with pytest.raises(AuthenticationError):
            authenticator.authenticate(key[:-1])


def test_unsalted_entries_still_authenticate_and_say_how_to_migrate(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, salted = new_api_key("fresh", ["read"])
    settings = make_settings(
        redis_url, api_keys=f"legacy:read+admin:{hash_api_key('old-key')},{salted}"
    )
    with caplog.at_level(logging.WARNING, logger="encoder_service.api.auth"):
        authenticator = Authenticator.from_settings(settings)
    assert "legacy" in caplog.text and "keys hash" in caplog.text
    assert "fresh" not in caplog.text
    assert authenticator.authenticate("old-key").scopes == {"read", "admin"}


def test_keys_hash_turns_an_existing_key_into_a_salted_entry_from_stdin() -> None:
    result = CliRunner().invoke(cli, ["keys", "hash", "legacy", "--scope", "admin"], input="k3y\n")
    assert result.exit_code == 0, result.stderr
    assert "k3y" not in result.output
    entry = result.output.split()[1]
    assert Authenticator(parse_api_keys(entry)).authenticate("k3y").scopes == {"admin"}
    empty = CliRunner().invoke(cli, ["keys", "hash", "legacy"], input="")
    assert empty.exit_code == 2 and "standard input" in empty.stderr


def test_a_keys_file_takes_comments_and_newlines_and_adds_to_the_inline_keys(
    tmp_path: Path, redis_url: str
) -> None:
    a, entry_a = new_api_key("a", ["read"])
    b, entry_b = new_api_key("b", ["ingest"])
    c, entry_c = new_api_key("c", ["admin"])
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# ops keys\n{entry_b}\n\n  # retired: x\n{entry_c},\n")
    settings = make_settings(redis_url, api_keys=entry_a, api_keys_file=keys_file)
    authenticator = Authenticator.from_settings(settings)
    assert [authenticator.authenticate(k).name for k in (a, b, c)] == ["a", "b", "c"]
    keys_file.write_text(entry_a)
    with pytest.raises(ValueError, match="appears twice"):
        Authenticator.from_settings(settings)
    with pytest.raises(ValueError, match="cannot read the API keys file"):
        Authenticator.from_settings(make_settings(redis_url, api_keys_file=tmp_path / "none"))


def _rewrite(path: Path, text: str) -> None:
    """Replace the file as an operator's tooling would: a new file renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    fresh.replace(path)


async def test_rewriting_the_keys_file_rotates_keys_in_a_running_server(
    redis_url: str, catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, old_entry = new_api_key("team", ["read"])
    new, new_entry = new_api_key("team", ["read"])
    keys_file = tmp_path / "keys"
    keys_file.write_text(old_entry)
    settings = make_settings(
        redis_url, api_keys="", api_keys_file=keys_file, api_keys_reload_seconds=0.05
    )

    async def status(client: httpx.AsyncClient, key: str) -> int:
        response = await client.get(
            "/v1/users/u1/embedding", headers={"Authorization": f"Bearer {key}"}
        )
        return response.status_code

    async with api_client(create_app(settings), "http") as client:
        assert (await status(client, old), await status(client, new)) == (200, 401)
        _rewrite(keys_file, new_entry)
        time.sleep(0.1)
        assert (await status(client, new), await status(client, old)) == (200, 401)

        with caplog.at_level(logging.ERROR, logger="encoder_service.api.auth"):
            _rewrite(keys_file, "team:read:this-is-not-a-digest")
            time.sleep(0.1)
            assert await status(client, new) == 200, "a broken file keeps the keys in force"
        assert "NOT reloaded" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``encoder-service --log-level DEBUG serve`` in a child process, its output in a file."""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_")}
    clean.pop("REDIS_URL", None)
    command = [sys.executable, "-m", "encoder_service.cli", "--log-level", "DEBUG", "serve"]
    with log_path.open("wb") as log_file:
        child = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO_ROOT,
            env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base_url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert child.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield base_url, child, log_path
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            raise


@pytest.mark.slow
def test_sighup_rotates_keys_and_no_key_reaches_the_logs(
    redis_url: str, catalog: Catalog, tmp_path: Path
) -> None:
    old, old_entry = new_api_key("team", ["read", "admin"])
    new, new_entry = new_api_key("team", ["read", "admin"])
    stranger = "not-a-configured-key-" + "x" * 20
    keys_file = tmp_path / "keys"
    keys_file.write_text(old_entry)
    env = {
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_HOME": str(tmp_path / "home"),
        "ENCODER_API_KEYS_FILE": str(keys_file),
        "ENCODER_API_KEYS_RELOAD_SECONDS": "3600",  # only the signal can reload within the test
        "ENCODER_API_ACCESS_LOG": "true",
    }

    def get(base_url: str, key: str, path: str = "/v1/users/u1/embedding") -> int:
        return httpx.get(base_url + path, headers={"Authorization": f"Bearer {key}"}).status_code

    with serve(tmp_path, **env) as (base_url, child, log_path):
        assert (get(base_url, old), get(base_url, new), get(base_url, stranger)) == (200, 401, 401)
        assert get(base_url, old, "/v1/admin/audit") == 200
        _rewrite(keys_file, new_entry)
        assert get(base_url, new) == 401, "no reload before the signal"
        child.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while get(base_url, new) != 200:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert get(base_url, old) == 401
        assert get(base_url, new, "/v1/admin/versions/v9/promote") == 405  # a GET on a POST route
    output = log_path.read_text()
    assert "API keys reloaded: 1 keys (team)" in output
    assert '"GET /v1/users/u1/embedding HTTP/1.1" 200' in output, "the access log was on"
    for secret in (old, new, stranger, old_entry.split(":")[-1], new_entry.split(":")[-1]):
        assert secret not in output
