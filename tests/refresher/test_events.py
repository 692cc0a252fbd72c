"""The stream layout and the entry format: sharding, round trips, the offline contract's rules."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
import redis

from encoder_service.data.contract import MAX_TIMESTAMP, ContractError, Event, parse_event
from encoder_service.data.tables import dataset_from_frames
from encoder_service.events import (
    _plain_event,
    append_events,
    event_to_fields,
    fields_to_raw,
    parse_entries,
    shard_of,
    stream_for,
    stream_key,
    stream_keys,
)


def test_the_shard_of_a_user_is_a_stable_crc32_not_a_salted_hash() -> None:
    # Pinned values: producers in other processes and languages must compute the same shard.
    assert [shard_of(u, 8) for u in ("u42", "alice@example.org", "b:42", "0")] == [6, 7, 5, 1]
    assert all(shard_of(u, 1) == 0 for u in ("u42", "x"))


def test_stream_keys_carry_the_shard_as_a_hash_tag() -> None:
    assert stream_key(3) == "events:{3}"
    assert stream_keys(3) == ["events:{0}", "events:{1}", "events:{2}"]
    assert stream_for("u42", 8) == "events:{6}"


def test_every_event_lands_on_its_users_shard_in_order(redis_client: redis.Redis) -> None:
    users = [f"user-{k}" for k in range(20)]
    events = [Event(u, f"i{n}", 1_718_000_000.0 + n) for n in range(3) for u in users]

    ids = append_events(redis_client, events, shards=4, maxlen=10_000)

    assert len(ids) == len(events)
    for user in users:
        rows = redis_client.xrange(stream_for(user, 4))
        mine = [f for _, f in rows if f[b"user_id"] == user.encode()]
        assert [f[b"item_id"] for f in mine] == [b"i0", b"i1", b"i2"]
    assert sum(redis_client.xlen(k) for k in stream_keys(4)) == len(events)


def test_streams_are_trimmed_approximately_to_maxlen(redis_client: redis.Redis) -> None:
    events = [Event("u1", "i1", 1_718_000_000.0 + n) for n in range(3000)]
    append_events(redis_client, events, shards=1, maxlen=1000)
    assert 1000 <= redis_client.xlen(stream_key(0)) < 3000


def test_fields_round_trip_to_the_very_event() -> None:
    event = Event(
        user_id="alice@example.org",
        item_id="movie-17",
        timestamp=1_718_000_000.123456789,
        event_type="view",
        weight=0.1,
        context="mobile",
        categories=("drama", "comedy"),
        profile={"age": 31.0, "country": "FR", "gender": None},
        idempotency_key="k-1",
    )
    fields = event_to_fields(event)
    assert all(isinstance(v, str) for v in fields.values())
    as_redis = {k.encode(): v.encode() for k, v in fields.items()}
    assert parse_event(fields_to_raw(as_redis)) == event


def test_optional_fields_are_left_out() -> None:
    fields = event_to_fields(Event("u1", "i1", 1_718_000_000.0))
    assert set(fields) == {"user_id", "item_id", "timestamp", "event_type", "weight"}


def test_a_producer_may_write_plain_strings_and_an_iso_time() -> None:
    raw = fields_to_raw(
        {
            b"user_id": b"u1",
            b"item_id": b"i1",
            b"timestamp": b"2024-06-10T08:00:00Z",
            b"profile": b'{"age": 40, "vip": true}',
            b"unknown_field": b"ignored",
        }
    )
    event = parse_event(raw)
    assert event.timestamp == 1_718_006_400.0
    assert event.profile == {"age": 40.0, "vip": "true"}
    assert event.weight == 1.0 and event.event_type == "interaction"


BAD_ROWS = [
    ({"user_id": ""}, "user_id"),
    ({"user_id": "a b"}, "user_id"),
    ({"user_id": "x{1}"}, "user_id"),
    ({"item_id": "é"}, "item_id"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"timestamp": "5e9"}, "timestamp"),
    ({"timestamp": "-1"}, "timestamp"),
    ({"weight": "-1"}, "weight"),
    ({"weight": "heavy"}, "weight"),
    ({"weight": "inf"}, "weight"),
    ({"event_type": "x" * 200}, "event_type"),
    ({"context": "y" * 129}, "context"),
]


@pytest.mark.parametrize(("change", "field"), BAD_ROWS)
def test_a_stream_entry_is_refused_exactly_where_the_offline_table_is(
    change: dict[str, str], field: str
) -> None:
    row = {
        "user_id": "u1",
        "item_id": "i1",
        "timestamp": "1718000000",
        "event_type": "view",
        "weight": "1",
        "context": "tv",
    } | change
    with pytest.raises(ContractError) as offline:
        dataset_from_frames(pd.DataFrame([row], dtype="str"), name="t")
    with pytest.raises(ContractError) as online:
        parse_event(fields_to_raw({k.encode(): v.encode() for k, v in row.items()}))
    assert offline.value.field == online.value.field == field


@pytest.mark.parametrize(
    ("profile", "reason"),
    [(b"{not json", "not a JSON object"), (b"[1, 2]", "must be an object of field: value")],
)
def test_a_profile_that_is_not_a_json_object_is_refused(profile: bytes, reason: str) -> None:
    fields = {b"user_id": b"u1", b"item_id": b"i1", b"timestamp": b"1", b"profile": profile}
    with pytest.raises(ContractError) as refused:
        parse_event(fields_to_raw(fields))
    assert refused.value.field == "profile" and refused.value.reason == reason


def test_bytes_that_are_not_utf8_are_refused_not_crashed_on() -> None:
    with pytest.raises(ContractError, match="UTF-8"):
        fields_to_raw({b"user_id": b"\xff\xfe", b"item_id": b"i1", b"timestamp": b"1"})


def test_a_timestamp_survives_the_stream_to_the_last_bit() -> None:
    values: list[Any] = [1_718_000_000.1, math.nextafter(1_718_000_000.0, 2e9), 0.5]
    for value in values:
        fields = event_to_fields(Event("u1", "i1", value))
        assert parse_event(fields_to_raw(fields)).timestamp == value


def _variants() -> list[dict[bytes, bytes]]:
    """Entries that probe every rule of the contract, valid and not, in many spellings."""
    base = {
        b"user_id": b"u1",
        b"item_id": b"i1",
        b"timestamp": b"1718000000.25",
        b"event_type": b"view",
        b"weight": b"2.5",
    }
    changes: list[dict[bytes, bytes | None]] = [
        {},
        {b"weight": None, b"event_type": None},
        {b"timestamp": b" 1718000000 "},
        {b"timestamp": b"1_718_000_000"},
        {b"timestamp": b"2024-06-10T08:00:00Z"},
        {b"timestamp": b"nan"},
        {b"timestamp": b"inf"},
        {b"timestamp": b"4102444800"},
        {b"timestamp": b"\xd9\xa1"},
        {b"timestamp": b""},
        {b"timestamp": None},
        {b"user_id": b"u1\n"},
        {b"user_id": "é".encode()},
        {b"user_id": b"a" * 128},
        {b"user_id": b"a" * 129},
        {b"item_id": b"\xff"},
        {b"weight": b""},
        {b"weight": b"  "},
        {b"weight": "\u00a0".encode()},
        {b"weight": b"nan"},
        {b"weight": b"-0.0"},
        {b"weight": b"1e6"},
        {b"weight": b"1000001"},
        {b"weight": b"-inf"},
        {b"event_type": b"  "},
        {b"event_type": " padded\u2003".encode()},
        {b"event_type": b"x" * 128},
        {b"context": b""},
        {b"context": b"tv"},
        {b"context": b"y" * 129},
        {b"categories": b"drama|comedy|drama| |"},
        {b"categories": b"z" * 129},
        {b"categories": b""},
        {b"idempotency_key": b"k-1"},
        {b"idempotency_key": b"   "},
        {b"profile": b'{"age": 31, "country": "FR", "vip": null}'},
        {b"profile": b"[1]"},
        {b"profile": b""},
        {b"unknown": b"ignored"},
    ]
    entries = []
    for change in changes:
        entry = {**base, **change}
        entries.append({k: v for k, v in entry.items() if v is not None})
    entries.append({k.decode(): v.decode() for k, v in base.items()})  # type: ignore[misc]
    return entries


def test_bulk_validation_decides_every_entry_exactly_as_parse_event() -> None:
    entries = _variants()
    parsed = parse_entries(entries)
    plain = 0
    for fields, outcome in zip(entries, parsed, strict=True):
        try:
            expected: Event | ContractError = parse_event(fields_to_raw(fields))
        except ContractError as exc:
            expected = exc
        if isinstance(expected, ContractError):
            assert isinstance(outcome, ContractError), fields
            assert (outcome.field, outcome.reason) == (expected.field, expected.reason)
        else:
            assert outcome == expected, fields
            assert type(outcome.timestamp) is float and type(outcome.weight) is float
            plain += 1
    assert plain >= 20 and len(parsed) - plain >= 10
    fast = sum(_plain_event(fields, MAX_TIMESTAMP) is not None for fields in entries)
    assert fast >= 15  # the common shapes really take the direct path


def test_bulk_validation_holds_events_to_the_latest_accepted_time() -> None:
    now = 1_750_000_000.0
    fields = {b"user_id": b"u1", b"item_id": b"i1", b"timestamp": str(now + 7200).encode()}
    (refused,) = parse_entries([fields], latest=now + 3600)
    with pytest.raises(ContractError) as expected:
        parse_event(fields_to_raw(fields), latest=now + 3600)
    assert isinstance(refused, ContractError)
    assert (refused.field, refused.reason) == (expected.value.field, expected.value.reason)
    (accepted,) = parse_entries([fields], latest=now + 10_800)
    assert isinstance(accepted, Event) and accepted.timestamp == now + 7200
