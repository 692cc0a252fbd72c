"""The event streams: which stream a user's events go to, the entry format, and the producer.

Events are sharded over ``N`` streams ``events:{0}`` .. ``events:{N-1}`` by the CRC-32 of the
user id, a hash that is the same in every process and language (Python's ``hash()`` is salted
per process). All of a user's events land in one stream, so they are read in the order they were
appended; the braces are a hash tag, so on a Redis Cluster every shard is its own slot and
consumers of different shards never contend.

An entry is flat string fields, so any Redis client can produce one with ``XADD``:

=================== ====================================================================
``user_id``         required; 1-128 of ``A-Z a-z 0-9 _ . : @ -``
``item_id``         required; same alphabet
``timestamp``       required; unix seconds (``1718000000.5``) or ISO-8601 (naive = UTC)
``event_type``      optional, default ``interaction``
``weight``          optional float >= 0, default 1
``context``         optional device / platform label
``categories``      optional item categories joined by ``|`` (for items a model does not know)
``profile``         optional JSON object of profile fields, e.g. ``{"age": 31, "country": "FR"}``;
                    numbers stay numeric, strings categorical, ``null`` means unknown
``idempotency_key`` optional; a second event of the same user with the same key within
                    ``idempotency_ttl_seconds`` is acknowledged but not applied
=================== ====================================================================

Unknown fields are ignored, up to ``MAX_ENTRY_FIELDS`` fields in all; no field name or value
may exceed ``MAX_FIELD_BYTES``. The refresher validates every entry with
:func:`encoder_service.data.contract.parse_event`, the rules the offline tables obey, and turns
an entry that breaks them into a dead letter naming the field.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import orjson
import redis
import redis.asyncio

from encoder_service.data.contract import CATEGORY_SEPARATOR, ContractError, Event

STREAM_PREFIX = "events:"
PROFILE_FIELD = "profile"
MAX_ENTRY_FIELDS = 32
"""Nine fields are known; the rest is room for producers' own annotations."""
MAX_FIELD_BYTES = 32_768
"""Above the largest valid ``profile`` (64 fields of 128-character names and values as JSON)."""

Fields: TypeAlias = Mapping[bytes, bytes] | Mapping[str, str]
"""An entry's fields: bytes as Redis returns them, or text as a producer writes them."""


def shard_of(user_id: str, shards: int) -> int:
    """The shard of ``user_id`` among ``shards``: CRC-32 of its UTF-8 bytes, modulo ``shards``."""
    return zlib.crc32(user_id.encode()) % shards


def stream_key(shard: int) -> str:
    return f"{STREAM_PREFIX}{{{shard}}}"


def stream_keys(shards: int) -> list[str]:
    return [stream_key(shard) for shard in range(shards)]


def stream_for(user_id: str, shards: int) -> str:
    """The stream every event of ``user_id`` goes to."""
    return stream_key(shard_of(user_id, shards))


def event_to_fields(event: Event) -> dict[str, str]:
    """The stream fields of a validated event; absent optional values are left out.

    ``repr`` of a float is its shortest exact decimal, so the refresher parses the very timestamp
    and weight the producer validated.
    """
    fields = {
        "user_id": event.user_id,
        "item_id": event.item_id,
        "timestamp": repr(event.timestamp),
        "event_type": event.event_type,
        "weight": repr(event.weight),
    }
    if event.context is not None:
        fields["context"] = event.context
    if event.categories:
        fields["categories"] = CATEGORY_SEPARATOR.join(event.categories)
    if event.profile:
        fields[PROFILE_FIELD] = orjson.dumps(dict(event.profile)).decode()
    if event.idempotency_key is not None:
        fields["idempotency_key"] = event.idempotency_key
    return fields


def fields_to_raw(fields: Fields) -> dict[str, Any]:
    """The mapping :func:`parse_event` validates, from an entry as Redis returns it.

    Raises:
        ContractError: too many fields, a field too long or not UTF-8, or ``profile`` is not
            a JSON object.
    """
    if len(fields) > MAX_ENTRY_FIELDS:
        raise ContractError(f"{len(fields)} fields; at most {MAX_ENTRY_FIELDS} are allowed")
    raw: dict[str, Any] = {}
    items: Iterable[tuple[bytes | str, bytes | str]] = fields.items()
    for key, value in items:
        if len(key) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            raise ContractError(f"longer than {MAX_FIELD_BYTES} bytes", field=_printable(key))
        try:
            name = key.decode() if isinstance(key, bytes) else key
            raw[name] = value.decode() if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise ContractError("not UTF-8 text", field=repr(key)[:40]) from None
    profile = raw.get(PROFILE_FIELD)
    if isinstance(profile, str) and profile:
        try:
            raw[PROFILE_FIELD] = orjson.loads(profile)
        except orjson.JSONDecodeError:
            raise ContractError("not a JSON object", field=PROFILE_FIELD) from None
    return raw


def _printable(name: bytes | str) -> str:
    """A field name fit for a dead letter's reason: decoded if it can be, and short."""
    if isinstance(name, bytes):
        try:
            name = name.decode()
        except UnicodeDecodeError:
            return repr(name)[:40]
    return name[:40]


def _appends(events: Iterable[Event], shards: int) -> list[tuple[str, dict[str, str]]]:
    return [(stream_for(e.user_id, shards), event_to_fields(e)) for e in events]


def append_events(
    client: redis.Redis, events: Sequence[Event], *, shards: int, maxlen: int
) -> list[str]:
    """XADD every event to its user's stream in one pipeline; returns the entry ids in order.

    ``MAXLEN ~`` lets Redis trim whole macro-nodes, which costs nothing per append, at the price
    of keeping a little more than ``maxlen`` entries.
    """
    pipe = client.pipeline(transaction=False)
    for key, fields in _appends(events, shards):
        pipe.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]


async def append_events_async(
    client: redis.asyncio.Redis, events: Sequence[Event], *, shards: int, maxlen: int
) -> list[str]:
    """:func:`append_events` over an asyncio client, for the API."""
    pipe = client.pipeline(transaction=False)
    for key, fields in _appends(events, shards):
        pipe.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return [i.decode() if isinstance(i, bytes) else str(i) for i in await pipe.execute()]
