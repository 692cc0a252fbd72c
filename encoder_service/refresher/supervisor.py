"""``refresh --processes N``: one command, N refresher processes, each pinned to its own shards.

One Python process is bound by one core; a deployment with more cores runs more consumers. Giving
each process its own shards (``--consume``) keeps every user in one process, so its events still
coalesce there and commits never conflict; correctness would hold without pinning (WATCH and the
last applied ids), but with shared shards most batches would collide on some user and retry.
The supervisor only starts, restarts and stops the children: a child that dies is started again
under the same consumer name, which resolves its pending entries first, exactly as a restart of
a single ``refresh`` does.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

RESTART_WAIT_S = 1.0
STOP_TIMEOUT_S = 30.0


def assign_shards(shards: int, consume: Sequence[int], processes: int) -> list[tuple[int, ...]]:
    """Split the shards to read (``consume``, default all) round-robin over ``processes``.

    Raises:
        ValueError: fewer shards than processes (a process would have nothing to read).
    """
    pool = sorted(set(consume)) or list(range(shards))
    if processes > len(pool):
        raise ValueError(
            f"--processes {processes} needs at least {processes} shards to pin users to "
            f"processes, but there are {len(pool)}; raise ENCODER_STREAM_SHARDS (producers "
            "and refreshers must agree on it)"
        )
    return [tuple(pool[k::processes]) for k in range(processes)]


@dataclass
class Child:
    """One refresher process and how to start it again."""

    command: list[str]
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)


def child_commands(
    groups: Sequence[tuple[int, ...]], *, shards: int, consumer: str, metrics_port: int
) -> list[list[str]]:
    """``refresh`` for each group of shards: consumer ``<consumer>-<k>``, metrics on
    ``metrics_port + k`` (none when 0)."""
    commands = []
    for k, group in enumerate(groups):
        command = [sys.executable, "-m", "encoder_service.refresher.cli", "refresh"]
        command += ["--shards", str(shards), "--consumer", f"{consumer}-{k}"]
        command += ["--metrics-port", str(metrics_port + k if metrics_port else 0)]
        for shard in group:
            command += ["--consume", str(shard)]
        commands.append(command)
    return commands


def supervise(commands: Sequence[list[str]], stop: threading.Event) -> None:
    """Run a child per command until ``stop`` is set, restarting any that exits; then SIGTERM
    them all (each finishes its batch in flight) and wait."""
    children = [Child(command) for command in commands]
    for child in children:
        child.start()
    try:
        while not stop.wait(RESTART_WAIT_S):
            for child in children:
                assert child.process is not None
                code = child.process.poll()
                if code is not None:
                    log.warning("refresher %s exited with %s; restarting", child.command, code)
                    child.start()
    finally:
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            if child.process is not None:
                try:
                    child.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
