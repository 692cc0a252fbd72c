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

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import orjson
import redis
import redis.asyncio

from encoder_service.data.contract import (
    CATEGORY_SEPARATOR,
    DEFAULT_EVENT_TYPE,
    ID_PATTERN,
    MAX_TEXT_LENGTH,
    MAX_TIMESTAMP,
    MAX_WEIGHT,
    MIN_TIMESTAMP,
    ContractError,
    Event,
    parse_categories,
    parse_event,
)

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


_ID_BYTES = re.compile(ID_PATTERN.pattern.encode())
_PLAIN_FIELDS = frozenset(
    f.encode()
    for f in (
        "user_id",
        "item_id",
        "timestamp",
        "event_type",
        "weight",
        "context",
        "categories",
        "idempotency_key",
    )
)


def parse_entries(
    entries: Iterable[Fields], *, latest: float = MAX_TIMESTAMP
) -> list[Event | ContractError]:
    """Validate many stream entries: per entry its event, or the error refusing it.

    ``latest`` is the latest accepted timestamp, as for :func:`parse_event`. Exactly
    :func:`parse_event` of :func:`fields_to_raw` for every entry, only cheaper for the
    common shape (known fields only, no profile, every value plainly valid), which is checked
    directly on the bytes Redis returned. Anything else, including every entry that breaks the
    contract, goes through ``parse_event`` itself, so refusals and their messages are its own.
    """
    parsed: list[Event | ContractError] = []
    for fields in entries:
        event: Event | ContractError | None = _plain_event(fields, latest)
        if event is None:
            try:
                event = parse_event(fields_to_raw(fields), latest=latest)
            except ContractError as exc:
                event = exc
        parsed.append(event)
    return parsed


def _plain_event(fields: Fields, latest: float) -> Event | None:
    """The event of an entry of the common shape; None when ``parse_event`` must decide."""
    if not _PLAIN_FIELDS.issuperset(fields):
        return None
    if any(len(value) > MAX_FIELD_BYTES for value in fields.values()):
        return None
    get: Any = fields.get
    try:
        user_id = _plain_id(get(b"user_id"))
        item_id = _plain_id(get(b"item_id"))
        timestamp = float(get(b"timestamp").strip())
        event_type = _plain_text(get(b"event_type")) or DEFAULT_EVENT_TYPE
        weight = _plain_weight(get(b"weight"))
        context = _plain_text(get(b"context"))
        categories = get(b"categories")
        return Event(
            user_id=user_id,
            item_id=item_id,
            timestamp=_plain_timestamp(timestamp, latest),
            event_type=event_type,
            weight=weight,
            context=context,
            categories=() if categories is None else parse_categories(categories.decode()),
            profile={},
            idempotency_key=_plain_text(get(b"idempotency_key")),
        )
    except (ValueError, TypeError, AttributeError):  # ContractError, UnicodeDecodeError too
        return None


def _plain_id(value: bytes) -> str:
    if _ID_BYTES.fullmatch(value) is None:
        raise ValueError
    return value.decode("ascii")


def _plain_timestamp(seconds: float, latest: float) -> float:
    if not (math.isfinite(seconds) and MIN_TIMESTAMP <= seconds < MAX_TIMESTAMP):
        raise ValueError
    if seconds > latest:
        raise ValueError
    return seconds


def _plain_weight(value: bytes | None) -> float:
    if value is None or not value.strip():
        return 1.0
    weight = float(value)
    if math.isnan(weight):
        return 1.0
    if not 0.0 <= weight <= MAX_WEIGHT:  # also refuses infinities
        raise ValueError
    return weight


def _plain_text(value: bytes | None) -> str | None:
    if value is None:
        return None
    text = value.decode().strip()
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError
    return text or None


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
