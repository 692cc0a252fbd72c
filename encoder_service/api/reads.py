"""Who reads which version: per API key counts, kept in memory and flushed to Redis each second.

The retire guard needs to know which downstream readers still use a version. Counting in Redis
per request would add a round trip to the hot path; a dict increment costs nothing, and one
pipelined flush per second per process keeps the registry's view at most a second behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from encoder_service.cluster import STORE_ERRORS
from encoder_service.registry import AsyncRegistry

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0


class ReadTracker:
    """Counts ``(version, key name)`` reads; flushes them through ``AsyncRegistry.record_reads``."""

    def __init__(self, registry: AsyncRegistry, *, interval: float = FLUSH_SECONDS) -> None:
        self.registry = registry
        self.interval = interval
        self._counts: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    def count(self, version: str, client: str, n: int = 1) -> None:
        key = (version, client)
        self._counts[key] = self._counts.get(key, 0) + n

    async def flush(self) -> None:
        """Write the counts gathered so far; on a Redis error keep them for the next flush."""
        counts, self._counts = self._counts, {}
        try:
            await self.registry.record_reads(counts, time.time())
        except STORE_ERRORS as exc:
            log.warning("could not record read counts (%s); retrying next flush", exc)
            for key, n in counts.items():
                self._counts[key] = self._counts.get(key, 0) + n

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    def start(self) -> None:
        """Flush every ``interval`` seconds from a background task of the running loop."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the background task and flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
