"""Stream entries outside the limits (written with a bare ``XADD``, past the API's checks)
become dead letters naming the field and the reason; the refresher carries on."""

from __future__ import annotations

import time

import pytest
import redis

from encoder_service.encoder import Encoder
from encoder_service.events import MAX_ENTRY_FIELDS, MAX_FIELD_BYTES, stream_key
from encoder_service.refresher.deadletter import list_dead_letters
from tests.refresher.conftest import RefresherFactory, run_once, stored_state

STREAM = stream_key(0)
GOOD = {b"user_id": b"fine", b"item_id": b"i1", b"timestamp": b"1718000000"}
TOO_MANY = {**GOOD, **{f"x{i}".encode(): b"1" for i in range(MAX_ENTRY_FIELDS)}}
OUT_OF_LIMITS = [
    (TOO_MANY, None, f"at most {MAX_ENTRY_FIELDS} are allowed"),
    ({**GOOD, b"note": b"n" * (MAX_FIELD_BYTES + 1)}, "note", f"longer than {MAX_FIELD_BYTES}"),
    ({**GOOD, b"timestamp": str(time.time() + 3 * 86_400).encode()}, "timestamp", "past the"),
    ({**GOOD, b"timestamp": b"inf"}, "timestamp", "outside the accepted window"),
    ({**GOOD, b"weight": b"inf"}, "weight", "outside 0"),
    ({**GOOD, b"weight": b"-1"}, "weight", "outside 0"),
    ({**GOOD, b"categories": b"|".join(b"c%d" % i for i in range(65))}, "categories", "more than"),
    ({**GOOD, b"user_id": b"u" * 129}, "user_id", "not a valid id"),
]


@pytest.mark.parametrize(
    ("fields", "field", "reason"), OUT_OF_LIMITS, ids=[r for _, _, r in OUT_OF_LIMITS]
)
def test_an_entry_out_of_limits_is_dead_lettered_with_its_reason(
    redis_client: redis.Redis,
    encoders: dict[str, Encoder],
    make_refresher: RefresherFactory,
    fields: dict[bytes, bytes],
    field: str | None,
    reason: str,
) -> None:
    bad_id = redis_client.xadd(STREAM, fields).decode()
    redis_client.xadd(STREAM, {**GOOD, b"user_id": b"after"})
    result = run_once(make_refresher())
    assert len(result.dead) == 1 and len(result.applied) == 1
    (letter,) = list_dead_letters(redis_client)
    assert letter.entry_id == bad_id and letter.field == field and reason in letter.reason
    assert stored_state(redis_client, "after") is not None
    assert stored_state(redis_client, "fine") is None
