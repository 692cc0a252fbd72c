"""The dead-letter stream ``events:dead``: entries the refresher could not apply, kept for a human.

An entry lands here when it breaks the input contract, or when applying it failed on
``max_deliveries`` deliveries (a corrupt stored state, say). It keeps the original fields
verbatim under ``event.<name>``, next to why it was refused and where it came from, so that after
a fix :func:`replay` can put exactly those fields back on the stream of their user. Moving an
entry here and acknowledging it on its stream happen in one transaction with the batch commit,
so an entry is never both dead and pending, nor neither.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import redis
from redis.client import Pipeline

from encoder_service import cluster
from encoder_service.data.contract import check_id
from encoder_service.events import stream_for

DEAD_LETTER_KEY = "events:dead"
FIELD_PREFIX = "event."
ENTRY_ID = re.compile(r"[0-9]+-[0-9]+")

Entries = list[tuple[bytes, dict[bytes, bytes]]]
"""An XRANGE reply from a client that returns bytes."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry to move to the dead-letter stream, and why."""

    stream: str
    entry_id: str
    fields: Mapping[bytes, bytes]
    reason: str
    deliveries: int
    field: str | None = None
    """The offending field, when the entry broke the input contract."""


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """An entry of ``events:dead`` as the CLI lists it."""

    dead_id: str
    stream: str
    entry_id: str
    reason: str
    field: str | None
    deliveries: int
    failed_at: float
    fields: dict[str, str]
    """The original fields, decoded (undecodable bytes replaced) for display."""


def queue_dead_letter(pipe: Pipeline, dead: DeadLetter, *, maxlen: int) -> None:
    """Queue the XADD of ``dead`` on a transaction the caller also acknowledges it in."""
    fields: dict[bytes | str, bytes | str] = {
        "reason": dead.reason,
        "stream": dead.stream,
        "entry_id": dead.entry_id,
        "deliveries": str(dead.deliveries),
        "failed_at": repr(time.time()),
    }
    if dead.field is not None:
        fields["field"] = dead.field
    for name, value in dead.fields.items():
        fields[FIELD_PREFIX.encode() + name] = value
    pipe.xadd(DEAD_LETTER_KEY, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


def _original(fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    prefix = FIELD_PREFIX.encode()
    return {k[len(prefix) :]: v for k, v in fields.items() if k.startswith(prefix)}


def _stored(dead_id: bytes, fields: Mapping[bytes, bytes]) -> StoredDeadLetter:
    field = fields.get(b"field")
    return StoredDeadLetter(
        dead_id=dead_id.decode(),
        stream=_text(fields.get(b"stream", b"")),
        entry_id=_text(fields.get(b"entry_id", b"")),
        reason=_text(fields.get(b"reason", b"")),
        field=None if field is None else _text(field),
        deliveries=int(fields.get(b"deliveries", b"0")),
        failed_at=float(fields.get(b"failed_at", b"0")),
        fields={_text(k): _text(v) for k, v in _original(fields).items()},
    )


def list_dead_letters(
    client: redis.Redis, *, count: int = 100, after: str = "-"
) -> list[StoredDeadLetter]:
    """Up to ``count`` dead letters, oldest first, from ``after`` (exclusive) on."""
    start = after if after == "-" else f"({after}"
    entries = cast(Entries, client.xrange(DEAD_LETTER_KEY, min=start, count=count))
    return [_stored(i, f) for i, f in entries]


def count_dead_letters(client: redis.Redis) -> int:
    return int(client.xlen(DEAD_LETTER_KEY))


def _target(stream: str, original: Mapping[bytes, bytes], shards: int) -> str:
    """The stream of the event's user under the current shard count.

    Shards may have changed since the event was first appended; a user id that still breaks the
    contract goes back to its old stream, to be refused again with the reason it has now.
    """
    try:
        return stream_for(check_id(original.get(b"user_id", b"").decode(), "user_id"), shards)
    except (ValueError, UnicodeDecodeError):
        return stream


def replay(
    client: redis.Redis,
    *,
    ids: Iterable[str] | None = None,
    shards: int,
    maxlen: int,
) -> list[tuple[str, str]]:
    """Append dead letters' original fields to their user's stream again, and remove them here.

    The refresher then treats each as a new event (a new entry id, so no last-applied id hides
    it). Each move is one MULTI/EXEC under WATCH of ``events:dead``, so a crash never loses an
    entry and two operators replaying at once never append it twice. Should one stream entry
    have been dead-lettered twice (two consumers that both held it, one of them stalled past
    ``claim_idle_ms``), it is appended once and every copy removed.

    On a Redis Cluster the user's stream and ``events:dead`` are on different slots, so a move
    is the append, then the removal: a crash between them leaves the dead letter, and
    replaying it again appends the event a second time (an ``idempotency_key`` makes that
    harmless); two operators replaying the same entry at once may both append it.

    Args:
        ids: dead-letter ids to replay; None replays every dead letter.

    Returns:
        ``(dead-letter id, new stream entry id)`` for each replayed entry; unknown ids are skipped.

    Raises:
        ValueError: an id is not a stream entry id (``<ms>-<seq>``).
    """
    malformed = [i for i in ids or () if not ENTRY_ID.fullmatch(i)]
    if malformed:
        raise ValueError(f"not dead-letter ids (<ms>-<seq>): {', '.join(malformed)}")
    copies: dict[tuple[bytes, bytes], list[str]] = {}
    origin_of: dict[str, tuple[bytes, bytes]] = {}
    for dead_id, fields in cast(Entries, client.xrange(DEAD_LETTER_KEY)):
        origin = (fields.get(b"stream", b""), fields.get(b"entry_id", b""))
        copies.setdefault(origin, []).append(dead_id.decode())
        origin_of[dead_id.decode()] = origin
    wanted = origin_of if ids is None else [i for i in ids if i in origin_of]
    moved: list[tuple[str, str]] = []
    for origin in dict.fromkeys(origin_of[i] for i in wanted):
        group = copies[origin]
        if cluster.is_cluster(client):
            results = _move_on_cluster(client, group, shards=shards, maxlen=maxlen)
        else:
            # The replies of the queued commands, XADD's new entry id first (bytes: the client
            # never decodes); redis-py types a transaction's result as anything.
            results = cast(
                list[bytes],
                client.transaction(
                    functools.partial(_queue_move, copies=group, shards=shards, maxlen=maxlen),
                    DEAD_LETTER_KEY,
                ),
            )
        if results:
            moved.append((group[0], results[0].decode()))
    return moved


def _move_on_cluster(
    client: redis.Redis, copies: list[str], *, shards: int, maxlen: int
) -> list[bytes]:
    """:func:`_queue_move` without the transaction a cluster cannot run across two slots:
    append the first copy's fields to the user's stream, then remove every copy."""
    found = cast(Entries, client.xrange(DEAD_LETTER_KEY, min=copies[0], max=copies[0]))
    if not found:
        return []
    _, fields = found[0]
    original = _original(fields)
    stream = _target(_text(fields.get(b"stream", b"")), original, shards)
    new_id = client.xadd(stream, original, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    client.xdel(DEAD_LETTER_KEY, *copies)
    return [cast(bytes, new_id)]


def _queue_move(pipe: Pipeline, copies: list[str], shards: int, maxlen: int) -> None:
    """Under WATCH, queue the XADD of the first copy's fields and the XDEL of every copy; or
    nothing if another replay removed them meanwhile."""
    found = cast(Entries, pipe.xrange(DEAD_LETTER_KEY, min=copies[0], max=copies[0]))
    if not found:
        return
    _, fields = found[0]
    original = _original(fields)
    stream = _target(_text(fields.get(b"stream", b"")), original, shards)
    pipe.multi()
    pipe.xadd(stream, original, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    pipe.xdel(DEAD_LETTER_KEY, *copies)
