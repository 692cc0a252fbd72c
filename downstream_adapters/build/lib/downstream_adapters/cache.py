"""A bounded in-process cache of embeddings with a time-to-live.

Embeddings of a pinned version change only when the refresher re-encodes a user, so a short TTL
trades a little staleness for far fewer requests when the same users are scored repeatedly.
Entries are keyed by (version, user), so two versions never mix.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

Entry = tuple[np.ndarray, float]
"""A vector and its ``updated_at`` (unix seconds)."""


class EmbeddingCache:
    """Least-recently-used cache; ``ttl`` in seconds, at most ``max_entries`` vectors.

    Thread-safe, so one cache can back a sync client used from several threads.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, Entry]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, version: str, user_id: str) -> Entry | None:
        key = (version, user_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= self._clock():
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put_many(self, version: str, items: Iterable[tuple[str, Entry]]) -> None:
        expires = self._clock() + self.ttl
        with self._lock:
            for user_id, entry in items:
                self._entries[(version, user_id)] = (expires, entry)
                self._entries.move_to_end((version, user_id))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
