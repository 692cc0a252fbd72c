"""The generic input contract: what a user's data must look like, offline and online.

Offline data is three tables (events, users, items) read from CSV or Parquet; online data is one
event at a time from the API or a stream. Both go through the rules here so that a field that is
refused online is refused offline too, and the feature code never sees a malformed value.

Tables (column names are exact; extra columns are ignored unless stated):

``events`` (required)
    ``user_id`` str, ``item_id`` str, ``timestamp`` (unix seconds, or an ISO-8601 string),
    optional ``event_type`` str (default ``interaction``), optional ``weight`` float >= 0
    (default 1.0; a rating or an interaction strength), optional ``context`` str (device,
    platform, ...).
``users`` (optional)
    ``user_id`` plus any number of profile columns; numeric columns become numeric fields,
    the others categorical. When given, every event's user must be in it.
``items`` (optional)
    ``item_id``, optional ``categories`` (names joined by ``|``), optional ``vector``
    (a content vector: a list column in Parquet, floats separated by spaces in CSV), and any
    number (up to 32) of numeric *item attribute* columns: a price, a duration, a release year.
    A column is numeric when its Parquet type is, or when every non-empty CSV value is a plain
    number; other extra columns (a title) are ignored. An empty value is a missing attribute;
    an infinite one is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}$")
"""User and item ids: 1-128 characters without braces or spaces, safe inside Redis hash tags."""

MIN_TIMESTAMP = 0.0
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01T00:00:00Z
MAX_WEIGHT = 1e6
MAX_TEXT_LENGTH = 128
MAX_PROFILE_FIELDS = 64
MAX_CATEGORIES = 64
MAX_ITEM_ATTRIBUTES = 32
CATEGORY_SEPARATOR = "|"

DEFAULT_EVENT_TYPE = "interaction"

EVENT_REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
EVENT_OPTIONAL_COLUMNS = ("event_type", "weight", "context")
USER_REQUIRED_COLUMNS = ("user_id",)
ITEM_REQUIRED_COLUMNS = ("item_id",)
ITEM_OPTIONAL_COLUMNS = ("categories", "vector")


class ContractError(ValueError):
    """A value that breaks the input contract.

    ``location`` names where it was found (a file and row, or an API field) so that the message
    printed to a user is one line that says exactly what to fix.
    """

    def __init__(self, message: str, *, field: str | None = None, location: str | None = None):
        self.field = field
        self.location = location
        self.reason = message
        prefix = ""
        if location:
            prefix += f"{location}: "
        if field:
            prefix += f"field '{field}': "
        super().__init__(prefix + message)


def check_id(value: Any, field: str) -> str:
    """Return ``value`` as an id string, or raise naming ``field``."""
    if isinstance(value, bool) or value is None:
        raise ContractError("missing or not an id", field=field)
    if isinstance(value, float):
        if not value.is_integer():
            raise ContractError(f"{value!r} is not a valid id", field=field)
        value = int(value)
    text = str(value)
    if not ID_PATTERN.fullmatch(text):
        raise ContractError(
            f"{text[:40]!r} is not a valid id (1-128 of A-Z a-z 0-9 _ . : @ -)", field=field
        )
    return text


def parse_timestamp(
    value: Any, field: str = "timestamp", *, latest: float = MAX_TIMESTAMP
) -> float:
    """Unix seconds from a number or an ISO-8601 string (naive strings are taken as UTC).

    ``latest`` narrows the window's end: online events are held to the receiving clock plus a
    margin, since one event from the far future would outweigh all of a user's real ones.
    """
    if isinstance(value, bool) or value is None:
        raise ContractError("missing timestamp", field=field)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ContractError(
                    f"{text[:40]!r} is neither unix seconds nor an ISO-8601 time", field=field
                ) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
    if not math.isfinite(seconds) or not MIN_TIMESTAMP <= seconds < MAX_TIMESTAMP:
        raise ContractError(
            f"{seconds!r} is outside the accepted window (1970-01-01 .. 2100-01-01)", field=field
        )
    if seconds > latest:
        raise ContractError(
            f"{seconds!r} is {seconds - latest:.0f} s past the latest accepted time "
            f"({datetime.fromtimestamp(latest, UTC).isoformat(timespec='seconds')})",
            field=field,
        )
    return seconds


def parse_weight(value: Any, field: str = "weight") -> float:
    """A finite, non-negative interaction strength; missing means 1.0."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    if isinstance(value, bool):
        raise ContractError("a boolean is not a weight", field=field)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ContractError(f"{str(value)[:40]!r} is not a number", field=field) from None
    if math.isnan(weight):
        return 1.0
    if not math.isfinite(weight) or not 0.0 <= weight <= MAX_WEIGHT:
        raise ContractError(f"{weight!r} is outside 0 .. {MAX_WEIGHT:g}", field=field)
    return weight


def parse_text(value: Any, field: str, default: str | None = None) -> str | None:
    """An optional short label (event type, context); empty means ``default``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    text = str(value).strip()
    if not text:
        return default
    if len(text) > MAX_TEXT_LENGTH:
        raise ContractError(f"longer than {MAX_TEXT_LENGTH} characters", field=field)
    return text


def parse_profile_value(value: Any, field: str) -> str | float | None:
    """A profile value: a finite number, a short string, or None for unknown."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isnan(number):
            return None
        if not math.isfinite(number):
            raise ContractError("not a finite number", field=field)
        return number
    return parse_text(value, field)


def parse_categories(value: Any, field: str = "categories") -> tuple[str, ...]:
    """Category names from a ``|``-joined string or a list; order kept, duplicates dropped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    parts = value.split(CATEGORY_SEPARATOR) if isinstance(value, str) else list(value)
    if len(parts) > MAX_CATEGORIES:
        raise ContractError(f"more than {MAX_CATEGORIES} categories", field=field)
    names: list[str] = []
    for part in parts:
        name = parse_text(part, field)
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class Event:
    """One validated user event, the unit both the offline replay and the refresher apply."""

    user_id: str
    item_id: str
    timestamp: float
    event_type: str = DEFAULT_EVENT_TYPE
    weight: float = 1.0
    context: str | None = None
    categories: tuple[str, ...] = ()
    """Categories of the item, for items the trained catalogue does not know (online only)."""
    profile: Mapping[str, str | float | None] = field(default_factory=dict)
    """Profile fields carried by the event; they overwrite the user's stored profile."""
    idempotency_key: str | None = None


def parse_event(raw: Mapping[str, Any], *, latest: float = MAX_TIMESTAMP) -> Event:
    """Validate one event given as a mapping (API body, stream entry, table row).

    ``latest``: the latest timestamp accepted (see :func:`parse_timestamp`).

    Raises:
        ContractError: naming the first field that breaks the contract.
    """
    for name in EVENT_REQUIRED_COLUMNS:
        if raw.get(name) in (None, ""):
            raise ContractError("required field is missing", field=name)
    profile_raw = raw.get("profile") or {}
    if not isinstance(profile_raw, Mapping):
        raise ContractError("must be an object of field: value", field="profile")
    if len(profile_raw) > MAX_PROFILE_FIELDS:
        raise ContractError(f"more than {MAX_PROFILE_FIELDS} fields", field="profile")
    profile: dict[str, str | float | None] = {}
    for key, value in profile_raw.items():
        profile_name = parse_text(key, "profile")
        if profile_name is None:
            raise ContractError("empty field name", field="profile")
        profile[profile_name] = parse_profile_value(value, f"profile.{profile_name}")
    return Event(
        user_id=check_id(raw.get("user_id"), "user_id"),
        item_id=check_id(raw.get("item_id"), "item_id"),
        timestamp=parse_timestamp(raw.get("timestamp"), latest=latest),
        event_type=parse_text(raw.get("event_type"), "event_type", DEFAULT_EVENT_TYPE)
        or DEFAULT_EVENT_TYPE,
        weight=parse_weight(raw.get("weight")),
        context=parse_text(raw.get("context"), "context"),
        categories=parse_categories(raw.get("categories")),
        profile=profile,
        idempotency_key=parse_text(raw.get("idempotency_key"), "idempotency_key"),
    )
