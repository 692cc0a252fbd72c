"""The refresher's loop: read the event streams as a consumer group, micro-batch, commit.

One process reads every shard it is given (``XREADGROUP`` over all of them at once) and scales
out by running more processes in the same group. Each iteration it

* reloads the live versions when the registry poll interval has passed;
* claims entries idle past ``claim_idle_ms`` (``XAUTOCLAIM``): a dead consumer's, or its own that
  failed;
* blocks up to ``block_ms`` for new entries, then keeps reading until ``batch_max_events`` or
  ``batch_max_wait_ms`` after the first, whichever comes first;
* validates each entry (a refused one becomes a dead letter) and commits the batch in one
  transaction (``commit.py``), re-encoding each user once whatever number of events it had.

On start it first re-reads its own pending entries (``XREADGROUP`` from id 0), which a previous
run under the same consumer name left behind. Bad input never stops the loop: an entry that
breaks the contract is dead-lettered at once; a batch that raises is retried user by user, and a
user whose commit keeps failing stays pending until its entries have been delivered
``max_deliveries`` times, then is dead-lettered with the error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff

from encoder_service import cluster
from encoder_service.data.contract import ContractError
from encoder_service.events import parse_entries, stream_keys
from encoder_service.refresher import metrics
from encoder_service.refresher.commit import Batch, CommitResult, StreamEvent, commit_batch
from encoder_service.refresher.deadletter import DeadLetter
from encoder_service.refresher.models import LiveVersions
from encoder_service.settings import Settings

log = logging.getLogger(__name__)

Entry = tuple[str, str, dict[bytes, bytes]]
"""A stream entry as read: stream key, entry id, fields (empty once trimmed from the stream)."""

RETRY_WAIT_S = 1.0
RETRY_BACKOFF = ExponentialBackoff(cap=5.0, base=0.25)
"""Waits between loop attempts while Redis fails: 0.5 s doubling to 5 s, so a blip costs half a
second and a long outage is polled gently (redis-py has already retried each command)."""
CLUSTER_POLL_MS = 5
"""How often a refresher reading several shards of a Redis Cluster polls them for entries."""
GAUGE_INTERVAL_S = 5.0
FORGET_CONSUMER_AFTER_MS = 3_600_000
CRASH_FACTOR = 2
"""An entry delivered ``CRASH_FACTOR * max_deliveries`` times was never committed nor refused
by anyone it was delivered to: its consumers died on it, so it is dead-lettered unattempted."""


@dataclass(frozen=True)
class RefresherConfig:
    shards: int
    group: str
    consumer: str
    batch_max_events: int
    batch_max_wait_ms: int
    block_ms: int
    claim_idle_ms: int
    max_deliveries: int
    idempotency_ttl: int
    maxlen: int
    max_future_seconds: float = 86_400.0
    """Entries timestamped further ahead of this process's clock are dead-lettered."""
    consume: tuple[int, ...] = ()
    """The shards this process reads; empty = all. Giving each process its own shards pins
    every user to one process, which keeps coalescing high and commit conflicts at zero."""

    def __post_init__(self) -> None:
        outside = [s for s in self.consume if not 0 <= s < self.shards]
        if outside:
            raise ValueError(f"shards {outside} do not exist among {self.shards}")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        shards: int | None = None,
        consumer: str | None = None,
        consume: tuple[int, ...] = (),
    ) -> RefresherConfig:
        return cls(
            consume=consume,
            shards=shards or settings.stream_shards,
            group=settings.consumer_group,
            consumer=consumer or settings.consumer_name,
            batch_max_events=settings.batch_max_events,
            batch_max_wait_ms=settings.batch_max_wait_ms,
            block_ms=settings.block_ms,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            idempotency_ttl=settings.idempotency_ttl_seconds,
            maxlen=settings.stream_maxlen,
            max_future_seconds=settings.event_max_future_seconds,
        )

    @property
    def streams(self) -> list[str]:
        """The stream keys this process reads."""
        keys = stream_keys(self.shards)
        return [keys[s] for s in sorted(set(self.consume))] if self.consume else keys


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(reply: Any) -> list[Entry]:
    """Flatten an XREADGROUP reply ``[[stream, [(id, fields), ...]], ...]``."""
    return [
        (_text(stream), _text(entry_id), fields or {})
        for stream, rows in reply
        for entry_id, fields in rows
    ]


class Refresher:
    """Keeps every live version's embeddings fresh from the event streams."""

    def __init__(self, client: redis.Redis, config: RefresherConfig, versions: LiveVersions):
        self.client = client
        self.config = config
        self.versions = versions

    # --- setup ---------------------------------------------------------------------------
    def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream itself) if missing.

        A new group starts at the beginning of the stream rather than its end: events appended
        before the first refresher started are applied, not silently skipped.
        """
        for stream in self.config.streams:
            try:
                self.client.xgroup_create(stream, self.config.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # --- the loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Refresh until ``stop`` is set; Redis outages are waited out, never fatal.

        While a batch commits, the next one is already being read on a second thread, so the
        time Redis takes to gather it overlaps this process's work. The read-ahead entries are
        delivered to this consumer like any others: pending until committed, processed before
        the loop returns, and taken up from the pending list after an error or a crash.
        """
        resume_own = True
        next_claim = next_gauges = 0.0
        failures = 0
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refresh-read-ahead")
        ahead: Future[list[Entry]] | None = None
        try:
            while not stop.is_set():
                try:
                    self.versions.maybe_reload()
                    metrics.LIVE_VERSIONS.set(len(self.versions.encoders))
                    if not self.versions.encoders:
                        stop.wait(RETRY_WAIT_S)
                        continue
                    if resume_own:
                        self.ensure_groups()
                        self.drain_own_pending()
                        resume_own = False
                    now = time.monotonic()
                    if now >= next_claim:
                        self.claim()
                        next_claim = now + self.config.claim_idle_ms / 2000
                    if now >= next_gauges:
                        metrics.observe_group(self.client, self.config.group, self.config.streams)
                        next_gauges = now + GAUGE_INTERVAL_S
                    entries = ahead.result() if ahead is not None else self.read_new(stop)
                    ahead = None
                    if entries:
                        ahead = reader.submit(self.read_new, stop)
                        self.process(entries)
                    failures = 0
                except cluster.STORE_ERRORS as exc:
                    # Unreachable, failing over, out of memory, a stream deleted: wait it out.
                    # The batch in flight (and any read ahead) is still pending under this
                    # consumer, so take that up first.
                    if ahead is not None:
                        wait([ahead])
                        ahead = None
                    metrics.FAILURES.labels(type(exc).__name__).inc()
                    failures += 1
                    pause = RETRY_BACKOFF.compute(failures)
                    log.warning("Redis error (%s); retry %d in %.1fs", exc, failures, pause)
                    resume_own = True
                    stop.wait(pause)
        finally:
            self._finish_read_ahead(ahead)
            reader.shutdown(wait=True)

    def _finish_read_ahead(self, ahead: Future[list[Entry]] | None) -> None:
        """On the way out, commit what was read ahead rather than leave it to a restart."""
        if ahead is None:
            return
        try:
            entries = ahead.result()
            if entries:
                self.process(entries)
        except cluster.STORE_ERRORS as exc:
            log.warning("read-ahead batch left pending (%s)", exc)

    def read_new(self, stop: threading.Event | None = None) -> list[Entry]:
        """Block for new entries, then gather more until the batch is full or its time is up."""
        config = self.config
        streams = {stream: ">" for stream in config.streams}
        reply = self._read_group(
            streams, max(1, config.batch_max_events // len(streams)), config.block_ms
        )
        entries = _entries(reply or [])
        if not entries:
            return entries
        deadline = time.monotonic() + config.batch_max_wait_ms / 1000
        while len(entries) < config.batch_max_events and not (stop and stop.is_set()):
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            reply = self._read_group(
                streams,
                max(1, (config.batch_max_events - len(entries)) // len(streams)),
                remaining_ms,
            )
            if not reply:
                break
            entries += _entries(reply)
        return entries

    def _read_group(self, streams: dict[str, str], count: int, block_ms: int) -> Any:
        """XREADGROUP over ``streams``, blocking up to ``block_ms`` for the first entry.

        A cluster refuses one XREADGROUP over streams on different slots, and blocking on each
        in turn would hold up the others; there every stream is read without blocking in one
        pipeline (fanned out to the nodes), polled every ``CLUSTER_POLL_MS`` until one has
        entries or the time is up. A refresher reading one shard blocks as on one server.
        """
        config = self.config
        if len(streams) == 1 or not cluster.is_cluster(self.client):
            return self.client.xreadgroup(
                config.group,
                config.consumer,
                streams,  # type: ignore[arg-type]
                count=count,
                block=block_ms,
            )
        deadline = time.monotonic() + block_ms / 1000
        while True:
            pipe = self.client.pipeline(transaction=False)
            for stream, cursor in streams.items():
                pipe.xreadgroup(config.group, config.consumer, {stream: cursor}, count=count)
            reply = [found for replies in pipe.execute() for found in replies or []]
            if reply or time.monotonic() >= deadline:
                return reply
            time.sleep(min(CLUSTER_POLL_MS / 1000, max(0.0, deadline - time.monotonic())))

    def drain_own_pending(self) -> int:
        """Process the entries a previous run under this consumer name read but never resolved.

        Each stream is walked from id 0 with a cursor, so entries that fail again are passed over
        (to be claimed later) rather than read again forever.
        """
        config = self.config
        done = 0
        for stream in config.streams:
            cursor = "0"
            while True:
                reply = self.client.xreadgroup(
                    config.group, config.consumer, {stream: cursor}, count=config.batch_max_events
                )
                entries = _entries(reply or [])
                if not entries:
                    break
                self.process(entries, redelivered=True)
                done += len(entries)
                cursor = entries[-1][1]
        if done:
            log.info("resolved %d entries left pending by a previous run", done)
        return done

    def claim(self) -> int:
        """Take over entries pending longer than ``claim_idle_ms`` and process them.

        Also forgets consumers idle for an hour with nothing pending, so that a group whose
        refreshers restart under new names does not collect them forever.
        """
        config = self.config
        claimed = 0
        for stream in config.streams:
            cursor = "0-0"
            while True:
                next_cursor, rows, deleted = self.client.xautoclaim(
                    stream,
                    config.group,
                    config.consumer,
                    config.claim_idle_ms,
                    start_id=cursor,
                    count=config.batch_max_events,
                )
                if deleted:
                    metrics.EVENTS.labels("trimmed").inc(len(deleted))
                entries = [(stream, _text(i), f or {}) for i, f in rows]
                if entries:
                    self.process(entries, redelivered=True)
                    claimed += len(entries)
                cursor = _text(next_cursor)
                if cursor == "0-0":
                    break
            self._forget_idle_consumers(stream)
        if claimed:
            log.info("claimed %d idle entries", claimed)
        return claimed

    def _forget_idle_consumers(self, stream: str) -> None:
        idle_ms = max(self.config.claim_idle_ms, FORGET_CONSUMER_AFTER_MS)
        for consumer in self.client.xinfo_consumers(stream, self.config.group):
            name = _text(consumer["name"])
            if (
                consumer["pending"] == 0
                and consumer["idle"] > idle_ms
                and name != self.config.consumer
            ):
                self.client.xgroup_delconsumer(stream, self.config.group, name)

    # --- one batch -------------------------------------------------------------------------
    def process(self, entries: Sequence[Entry], *, redelivered: bool = False) -> CommitResult:
        """Validate, apply and commit ``entries``; what could not be resolved stays pending.

        Args:
            redelivered: the entries were read before (own pending, claimed); their delivery
                counts are then looked up to find the ones to give up on.
        """
        started = time.perf_counter()
        deliveries = self._deliveries(entries) if redelivered else {}
        batch = self._validate(entries, deliveries)
        encoders = self.versions.encoders
        try:
            result = self._commit(batch)
        except cluster.STORE_ERRORS:
            raise  # the store, not the data: the loop waits and retries
        except Exception as exc:
            metrics.FAILURES.labels(type(exc).__name__).inc()
            log.warning("batch of %d entries failed (%s); retrying user by user", len(batch), exc)
            originals = {(stream, entry_id): fields for stream, entry_id, fields in entries}
            result = self._commit_per_user(batch, deliveries, originals)
        metrics.record_commit(result, encoders, len(entries), time.perf_counter() - started)
        return result

    def _commit(self, batch: Batch) -> CommitResult:
        return commit_batch(
            self.client,
            batch,
            self.versions.encoders,
            group=self.config.group,
            idempotency_ttl=self.config.idempotency_ttl,
            dead_maxlen=self.config.maxlen,
            translations=self.versions.translations,
        )

    def _deliveries(self, entries: Sequence[Entry]) -> dict[tuple[str, str], int]:
        pipe = self.client.pipeline(transaction=False)
        for stream, entry_id, _ in entries:
            pipe.xpending_range(stream, self.config.group, entry_id, entry_id, 1)
        counts: dict[tuple[str, str], int] = {}
        for (stream, entry_id, _), rows in zip(entries, pipe.execute(), strict=True):
            if rows:
                counts[(stream, entry_id)] = int(rows[0]["times_delivered"])
        return counts

    def _validate(
        self, entries: Sequence[Entry], deliveries: Mapping[tuple[str, str], int]
    ) -> Batch:
        batch = Batch()
        give_up = CRASH_FACTOR * self.config.max_deliveries
        latest = time.time() + self.config.max_future_seconds
        readable: list[tuple[str, str, dict[bytes, bytes], int]] = []
        for stream, entry_id, fields in entries:
            if not fields:
                batch.acks.append((stream, entry_id))
                continue
            count = deliveries.get((stream, entry_id), 1)
            if count >= give_up:
                reason = f"delivered {count} times without a commit: its consumers kept dying"
                batch.dead.append(DeadLetter(stream, entry_id, fields, reason, count))
                continue
            readable.append((stream, entry_id, fields, count))
        parsed = parse_entries((fields for _, _, fields, _ in readable), latest=latest)
        for (stream, entry_id, fields, count), event in zip(readable, parsed, strict=True):
            if isinstance(event, ContractError):
                batch.dead.append(
                    DeadLetter(stream, entry_id, fields, event.reason, count, field=event.field)
                )
            else:
                batch.events.append(StreamEvent(stream, entry_id, event))
        return batch

    def _commit_per_user(
        self,
        batch: Batch,
        deliveries: Mapping[tuple[str, str], int],
        originals: Mapping[tuple[str, str], dict[bytes, bytes]],
    ) -> CommitResult:
        """Commit the batch one user at a time, so one user's bad data holds up only that user.

        A user whose commit fails again is dead-lettered once its entries have been delivered
        ``max_deliveries`` times; before that its entries stay pending and are claimed again
        after ``claim_idle_ms``, which spaces out the retries.
        """
        result = CommitResult()
        if batch.dead or batch.acks:
            result.extend(self._commit(Batch(dead=batch.dead, acks=batch.acks)))
        by_user: dict[str, list[StreamEvent]] = {}
        for e in batch.events:
            by_user.setdefault(e.event.user_id, []).append(e)
        for user, events in by_user.items():
            try:
                result.extend(self._commit(Batch(events=events)))
                continue
            except cluster.STORE_ERRORS:
                raise
            except Exception as exc:
                metrics.FAILURES.labels(type(exc).__name__).inc()
                error = f"{type(exc).__name__}: {exc}"
            count = max(deliveries.get((e.stream, e.entry_id), 1) for e in events)
            if count < self.config.max_deliveries:
                log.warning("user %s: %s; %d entries stay pending", user, error, len(events))
                continue
            log.error("user %s: %s on delivery %d; dead-lettering its entries", user, error, count)
            dead = [
                DeadLetter(e.stream, e.entry_id, originals[(e.stream, e.entry_id)], error, count)
                for e in events
            ]
            result.extend(self._commit(Batch(dead=dead)))
        return result
