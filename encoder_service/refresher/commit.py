"""Apply one batch of stream entries exactly once: states, embeddings, last ids and acks together.

Delivery is at-least-once (a consumer can die after reading and before acknowledging), so the
effect is made exactly-once here, from three rules:

1. **One transaction.** A user's new state, its embedding under every live version, and its
   ``meta:{user}`` record (the last applied entry id per stream) are written in the same
   MULTI/EXEC as the XACK of the entries and the XADD of any dead letters. A crash leaves either
   all of it or none of it.
2. **Skip what is applied.** An entry whose id is at or below its user's last applied id for that
   stream is acknowledged without being applied again; so is an event whose idempotency key the
   user already used (``idem:{user}:<key>``, written in the same transaction).
3. **Apply a user's entries in id order.** Rule 2 is only sound if no entry of a user is applied
   while an older one of the same stream is still unapplied, which a dead consumer's pending
   entries, or an entry left pending after a failure, could otherwise break. Entries are
   delivered in id order, so such an older entry can only be pending (delivered, not yet
   acknowledged) somewhere. The batch therefore *borrows* every older pending entry of its users
   from wherever it is pending, and applies each user's entries in id order. Borrowing does not
   claim: the entry stays where it is, and if its owner commits it first, rule 2 and the WATCH
   below make the second commit a no-op for it.

The state read, the apply and the write run under WATCH of the users' state and meta keys:
should another consumer commit one of these users meanwhile, EXEC fails and the batch is read
and applied again, so that commit is never overwritten.

**On a Redis Cluster** one transaction cannot span the batch's slots, so rule 1 holds per slot
(:func:`_commit_per_slot`): the users' states and metas are read (one MGET per slot), the batch
is applied and encoded together as on one server, and each slot's writes go out as one
compare-and-set script that writes only if the slot's users' state and meta still hold what was
read (the stand-in for WATCH); a slot that changed is read and applied again on its own. Only
once every slot has committed are the dead letters added and then the entries acknowledged. A
crash in between leaves entries pending that some users already applied: on redelivery rule 2
skips them (their ids are at or below the user's last applied id, kept in the user's own slot),
so the effect stays exactly once. A dead letter can be added twice in that window (at least
once, never lost).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

import redis
from redis.client import Pipeline

from encoder_service import cluster
from encoder_service.data.contract import ContractError, Event, parse_event
from encoder_service.encoder import Encoder
from encoder_service.events import fields_to_raw
from encoder_service.features.batch import StateBatch
from encoder_service.features.translation import CatalogTranslation, fill_missing_batch
from encoder_service.refresher.deadletter import DeadLetter, queue_dead_letter
from encoder_service.store import (
    decode_meta,
    embedding_key,
    encode_embeddings,
    encode_meta,
    meta_key,
    state_key,
)

MAX_CONFLICT_RETRIES = 10
SLACK = 256
"""Pending entries listed beyond the batch's own in the first XPENDING; more are listed in a
second call only when the PEL holds more."""


class CommitConflictError(RuntimeError):
    """Other writers kept changing this batch's users; the entries stay pending for a retry."""


@functools.lru_cache(maxsize=1 << 16)
def parse_id(entry_id: str) -> tuple[int, int]:
    """A stream id ``<ms>-<seq>`` as a tuple that compares the way Redis orders ids (cached:
    a batch compares each of its ids several times)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def idempotency_key(user_id: str, key: str) -> str:
    """Where a user's used idempotency key is remembered; the user's hash tag keeps it on the
    slot of the user's state, inside the same transaction."""
    return f"idem:{{{user_id}}}:{key}"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A validated event and the stream entry it came from."""

    stream: str
    entry_id: str
    event: Event


@dataclass
class Batch:
    """What one commit resolves: events to apply, entries to dead-letter, entries just to ack
    (trimmed from the stream before they were read)."""

    events: list[StreamEvent] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    acks: list[tuple[str, str]] = field(default_factory=list)

    def entry_ids(self) -> dict[str, set[str]]:
        """Stream -> every entry id this batch holds."""
        ids: dict[str, set[str]] = {}
        for e in self.events:
            ids.setdefault(e.stream, set()).add(e.entry_id)
        for d in self.dead:
            ids.setdefault(d.stream, set()).add(d.entry_id)
        for stream, entry_id in self.acks:
            ids.setdefault(stream, set()).add(entry_id)
        return ids

    def __len__(self) -> int:
        return len(self.events) + len(self.dead) + len(self.acks)


@dataclass
class CommitResult:
    applied: list[StreamEvent] = field(default_factory=list)
    duplicates: list[StreamEvent] = field(default_factory=list)
    """Acknowledged without being applied: already applied, or an idempotency key reused."""
    borrowed: list[StreamEvent] = field(default_factory=list)
    """Older pending entries of the batch's users, taken from outside the batch (rule 3)."""
    dead: list[DeadLetter] = field(default_factory=list)
    trimmed: int = 0
    users: list[str] = field(default_factory=list)
    """Users re-encoded, once each however many of their events the batch held."""
    committed_at: float = 0.0
    conflicts: int = 0

    def extend(self, other: CommitResult) -> None:
        """Fold in the result of another commit of the same batch's entries."""
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.borrowed += other.borrowed
        self.dead += other.dead
        self.trimmed += other.trimmed
        self.users += other.users
        self.committed_at = max(self.committed_at, other.committed_at)
        self.conflicts += other.conflicts


@dataclass
class _Plan:
    """The users with at least one event to apply, their states with those events applied
    (one row each), and what their meta records and idempotency keys become."""

    users: list[str]
    states: StateBatch
    last_ids: list[dict[str, str]]
    new_keys: list[list[str]]


def commit_batch(
    client: redis.Redis,
    batch: Batch,
    encoders: Mapping[str, Encoder],
    *,
    group: str,
    idempotency_ttl: int,
    dead_maxlen: int,
    translations: Mapping[str, list[CatalogTranslation]] = MappingProxyType({}),
) -> CommitResult:
    """Resolve every entry of ``batch`` in one transaction.

    Args:
        encoders: version -> encoder, every live version; each user touched is re-encoded by all.
        translations: item-sum maps between the live catalogues; a user's state that has no
            sums for a live catalogue yet gets them from another before its events apply.

    Raises:
        CommitConflictError: WATCH kept failing ``MAX_CONFLICT_RETRIES`` times.
        redis.RedisError, ValueError: nothing was written; the entries stay pending.
    """
    borrowed = _older_pending(client, group, batch)
    events = sorted([*batch.events, *borrowed], key=lambda e: (e.stream, parse_id(e.entry_id)))
    result = CommitResult(borrowed=borrowed, dead=list(batch.dead), trimmed=len(batch.acks))
    users = list(dict.fromkeys(e.event.user_id for e in events))
    catalogs = {e.catalog_id: e.catalog for e in encoders.values()}
    if cluster.is_cluster(client):
        _commit_per_slot(
            client, users, events, encoders, catalogs, translations, idempotency_ttl, result
        )
        _resolve_entries(client, group, batch, borrowed, dead_maxlen)
        return result
    watched = [k for u in users for k in (state_key(u), meta_key(u))]
    with client.pipeline(transaction=True) as pipe:
        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                if watched:
                    pipe.watch(*watched)
                keys, keyed = _read_keys(users, events)
                values = cast(list[bytes | None], pipe.mget(keys)) if keys else []
                plan = _plan(values, users, events, keyed, catalogs, translations, result)
                result.committed_at = time.time()
                pipe.multi()
                _queue_users(pipe, plan, encoders, result.committed_at, idempotency_ttl)
                _queue_acks(pipe, group, batch, borrowed)
                for dead in batch.dead:
                    queue_dead_letter(pipe, dead, maxlen=dead_maxlen)
                pipe.execute()
                result.users = plan.users
                result.conflicts = attempt
                return result
            except redis.WatchError:
                pipe.reset()
                result.applied.clear()
                result.duplicates.clear()
    raise CommitConflictError(
        f"{len(users)} users kept changing under {MAX_CONFLICT_RETRIES} commit attempts"
    )


def _commit_per_slot(
    client: redis.Redis,
    users: Sequence[str],
    events: Sequence[StreamEvent],
    encoders: Mapping[str, Encoder],
    catalogs: Mapping,
    translations: Mapping[str, list[CatalogTranslation]],
    idempotency_ttl: int,
    result: CommitResult,
) -> None:
    """Rule 1 on a cluster: every slot's users committed by one compare-and-set each.

    A slot whose users changed since the read is read, applied and written again, alone.
    """
    pending = list(users)
    for attempt in range(MAX_CONFLICT_RETRIES):
        wanted = set(pending)
        todo = [e for e in events if e.event.user_id in wanted]
        keys, keyed = _read_keys(pending, todo)
        values = cluster.mget(client, keys)
        trial = CommitResult()
        plan = _plan(values, pending, todo, keyed, catalogs, translations, trial)
        committed_at = time.time()
        n = len(pending)
        read = {
            u: {state_key(u): values[i], meta_key(u): values[n + i]} for i, u in enumerate(pending)
        }
        embedded, blobs = _encoded(plan, encoders)
        groups: list[cluster.GuardedWrite] = []
        members: list[list[str]] = []
        for slot_users in cluster.group_by_slot(
            range(len(plan.users)), _state_key_of(plan)
        ).values():
            group = cluster.GuardedWrite({}, ttl=idempotency_ttl)
            for row in slot_users:
                user = plan.users[row]
                group.read.update(read[user])
                group.writes.update(_user_writes(plan, row, embedded, blobs, committed_at))
                for key in plan.new_keys[row]:
                    group.expiring[idempotency_key(user, key)] = b"1"
            groups.append(group)
            members.append([plan.users[row] for row in slot_users])
        done = cluster.write_if_unchanged(client, groups)
        failed = {
            u for slot_users, ok in zip(members, done, strict=True) if not ok for u in slot_users
        }
        result.applied += [e for e in trial.applied if e.event.user_id not in failed]
        result.duplicates += [e for e in trial.duplicates if e.event.user_id not in failed]
        result.users += [u for u in plan.users if u not in failed]
        result.committed_at = committed_at
        if not failed:
            result.conflicts = attempt
            return
        pending = [u for u in pending if u in failed]
    raise CommitConflictError(
        f"{len(pending)} users kept changing under {MAX_CONFLICT_RETRIES} commit attempts"
    )


def _state_key_of(plan: _Plan) -> Callable[[int], str]:
    """A plan row's state key, the key its user's slot is found by."""
    return lambda row: state_key(plan.users[row])


def _resolve_entries(
    client: redis.Redis,
    group: str,
    batch: Batch,
    borrowed: Sequence[StreamEvent],
    dead_maxlen: int,
) -> None:
    """On a cluster, after every user's slot committed: add the dead letters, then XACK.

    Two steps, because a cluster pipeline runs commands of different nodes in no set order,
    and an entry acknowledged before its dead letter exists would be lost by a crash between.
    """
    if batch.dead:
        pipe = client.pipeline(transaction=False)
        for dead in batch.dead:
            queue_dead_letter(pipe, dead, maxlen=dead_maxlen)
        pipe.execute()
    pipe = client.pipeline(transaction=False)
    _queue_acks(pipe, group, batch, borrowed)
    if len(pipe):
        pipe.execute()


def _older_pending(client: redis.Redis, group: str, batch: Batch) -> list[StreamEvent]:
    """Entries pending outside ``batch``, on its streams, of its users, older than their newest
    entry in it (rule 3).

    In the steady state the only pending entries are the batch's own, so this costs one
    round trip (the PEL summary and its first entries up to the batch's newest, pipelined).
    Entries trimmed from the stream, or breaking the contract, are left to whoever holds them:
    they change no state.
    """
    ids = batch.entry_ids()
    newest: dict[tuple[str, str], tuple[int, int]] = {}
    for e in batch.events:
        key = (e.stream, e.event.user_id)
        newest[key] = max(newest.get(key, (0, 0)), parse_id(e.entry_id))
    streams = list(dict.fromkeys(e.stream for e in batch.events))
    if not streams:
        return []
    pipe = client.pipeline(transaction=False)
    newest_id = {stream: max(ids[stream], key=parse_id) for stream in streams}
    for stream in streams:
        pipe.xpending(stream, group)
        pipe.xpending_range(stream, group, "-", newest_id[stream], len(ids[stream]) + SLACK)
    replies = pipe.execute()
    listed: dict[str, list] = {}
    for k, stream in enumerate(streams):
        total, rows = int(replies[2 * k]["pending"]), replies[2 * k + 1]
        if len(rows) == len(ids[stream]) + SLACK and total > len(rows):  # more than fit
            rows = client.xpending_range(stream, group, "-", newest_id[stream], total)
        listed[stream] = rows
    others = [
        (stream, row["message_id"].decode())
        for stream, rows in listed.items()
        for row in rows
        if row["message_id"].decode() not in ids[stream]
    ]
    if not others:
        return []
    for stream, entry_id in others:
        pipe.xrange(stream, min=entry_id, max=entry_id)
    borrowed: list[StreamEvent] = []
    for (stream, entry_id), found in zip(others, pipe.execute(), strict=True):
        if not found:
            continue
        try:
            event = parse_event(fields_to_raw(found[0][1]))
        except ContractError:
            continue
        if parse_id(entry_id) < newest.get((stream, event.user_id), (0, 0)):
            borrowed.append(StreamEvent(stream, entry_id, event))
    return borrowed


def _read_keys(
    users: Sequence[str], events: Sequence[StreamEvent]
) -> tuple[list[str], list[tuple[str, str]]]:
    """What :func:`_plan` reads: the users' state keys, their meta keys, then the idempotency
    keys of the events that carry one; and those ``(user, key)`` pairs."""
    keyed = list(
        dict.fromkeys(
            (e.event.user_id, e.event.idempotency_key)
            for e in events
            if e.event.idempotency_key is not None
        )
    )
    keys = [state_key(u) for u in users] + [meta_key(u) for u in users]
    return keys + [idempotency_key(u, k) for u, k in keyed], keyed


def _plan(
    values: Sequence[bytes | None],
    users: Sequence[str],
    events: Sequence[StreamEvent],
    keyed: Sequence[tuple[str, str]],
    catalogs: Mapping,
    translations: Mapping[str, list[CatalogTranslation]],
    result: CommitResult,
) -> _Plan:
    """Apply the events not yet applied to the users' states and last ids, all users at once,
    from ``values`` as read for :func:`_read_keys` (under WATCH on one server); the plan holds
    the users with an event applied."""
    plan = _Plan([], StateBatch.empty(0), [], [])
    if not users:
        return plan
    n = len(users)
    states, metas, used = values[:n], values[n : 2 * n], values[2 * n :]
    seen = {pair for pair, raw in zip(keyed, used, strict=True) if raw is not None}
    stored = dict(zip(users, states, strict=True))
    last_ids = {u: decode_meta(m)[1] for u, m in zip(users, metas, strict=True)}
    row: dict[str, int] = {}
    to_apply: list[tuple[int, Event]] = []
    for e in events:
        user = e.event.user_id
        last = last_ids[user].get(e.stream)
        key = e.event.idempotency_key
        if last is not None and parse_id(e.entry_id) <= parse_id(last):
            result.duplicates.append(e)
            continue
        last_ids[user][e.stream] = e.entry_id
        if key is not None and (user, key) in seen:
            result.duplicates.append(e)
            continue
        u = row.get(user)
        if u is None:
            u = row[user] = len(plan.users)
            plan.users.append(user)
            plan.last_ids.append(last_ids[user])
            plan.new_keys.append([])
        to_apply.append((u, e.event))
        if key is not None:
            seen.add((user, key))
            plan.new_keys[u].append(key)
        result.applied.append(e)
    plan.states = StateBatch.from_bytes([stored[user] for user in plan.users])
    fill_missing_batch(plan.states, translations)
    plan.states.apply(to_apply, catalogs)
    return plan


def _encoded(
    plan: _Plan, encoders: Mapping[str, Encoder]
) -> tuple[dict[str, list[bytes]], list[bytes]]:
    """Every planned user's embedding under each version, and its serialised state."""
    if not plan.users:
        return {}, []
    values = {
        version: encode_embeddings(
            encoder.encode_features(encoder.vectorize(plan.states)),
            encoder.dtype,  # type: ignore[arg-type]
        )
        for version, encoder in encoders.items()
    }
    return values, plan.states.to_bytes()


def _user_writes(
    plan: _Plan,
    row: int,
    embedded: Mapping[str, list[bytes]],
    blobs: Sequence[bytes],
    committed_at: float,
) -> dict[str, bytes]:
    """Plan row ``row``'s state, embedding under every version and meta record."""
    user = plan.users[row]
    writes = {state_key(user): blobs[row]}
    for version, rows in embedded.items():
        writes[embedding_key(version, user)] = rows[row]
    writes[meta_key(user)] = encode_meta(committed_at, plan.last_ids[row])
    return writes


def _queue_users(
    pipe: Pipeline,
    plan: _Plan,
    encoders: Mapping[str, Encoder],
    committed_at: float,
    idempotency_ttl: int,
) -> None:
    """Queue each planned user's state, embeddings under every version, meta and used keys."""
    if not plan.users:
        return
    embedded, blobs = _encoded(plan, encoders)
    writes: dict[str, bytes] = {}
    for row in range(len(plan.users)):
        writes.update(_user_writes(plan, row, embedded, blobs, committed_at))
    pipe.mset(writes)  # type: ignore[arg-type]
    for user, keys in zip(plan.users, plan.new_keys, strict=True):
        for key in keys:
            pipe.set(idempotency_key(user, key), b"1", ex=idempotency_ttl)


def _queue_acks(pipe: Pipeline, group: str, batch: Batch, borrowed: Sequence[StreamEvent]) -> None:
    """XACK every entry of the batch and every borrowed one, one command per stream."""
    ids = batch.entry_ids()
    for e in borrowed:
        ids.setdefault(e.stream, set()).add(e.entry_id)
    for stream, entry_ids in ids.items():
        if entry_ids:
            pipe.xack(stream, group, *sorted(entry_ids, key=parse_id))
