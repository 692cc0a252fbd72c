"""Dead letters: refused entries are kept with their reason and fields, and replayed after a fix."""

from __future__ import annotations

import pytest
import redis
from typer.testing import CliRunner

from encoder_service.encoder import Encoder
from encoder_service.events import append_events, stream_key
from encoder_service.refresher.cli import app
from encoder_service.refresher.deadletter import (
    DEAD_LETTER_KEY,
    count_dead_letters,
    list_dead_letters,
    replay,
)
from encoder_service.settings import get_settings
from encoder_service.store import state_key
from tests.refresher.conftest import (
    RefresherFactory,
    drained,
    event,
    replay_once,
    run_once,
    running,
    stored_state,
    wait_until,
)

STREAM = stream_key(0)
GOOD = {b"user_id": b"fine", b"item_id": b"i1", b"timestamp": b"1718000000"}
MALFORMED = [
    ({b"user_id": b"u1"}, "item_id", "required field is missing"),
    ({**GOOD, b"user_id": b"not valid"}, "user_id", "is not a valid id"),
    ({**GOOD, b"timestamp": b"yesterday"}, "timestamp", "neither unix seconds nor"),
    ({**GOOD, b"profile": b"{oops"}, "profile", "not a JSON object"),
    ({**GOOD, b"item_id": b"\xff\xfe"}, "b'item_id'", "not UTF-8"),
]


def test_malformed_entries_become_dead_letters_and_the_worker_keeps_going(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    ids = [redis_client.xadd(STREAM, GOOD).decode()]
    ids += [redis_client.xadd(STREAM, fields).decode() for fields, _, _ in MALFORMED]
    with running(make_refresher()) as worker:
        wait_until(lambda: drained(redis_client, [STREAM]))
        later = event("after-the-bad-ones", "i2", 1_718_000_100.0)
        append_events(redis_client, [later], shards=1, maxlen=10_000)
        wait_until(lambda: stored_state(redis_client, "after-the-bad-ones") is not None)
        assert worker.is_alive()

    letters = list_dead_letters(redis_client)
    assert len(letters) == len(MALFORMED) == count_dead_letters(redis_client)
    for letter, entry_id, (fields, field, reason) in zip(letters, ids[1:], MALFORMED, strict=True):
        assert letter.stream == STREAM and letter.entry_id == entry_id
        assert letter.field == field and reason in letter.reason
        assert letter.deliveries == 1
        assert letter.fields == {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    assert stored_state(redis_client, "fine").count == 1  # type: ignore[union-attr]
    assert redis_client.xpending(STREAM, "refresh")["pending"] == 0


def test_a_user_that_keeps_failing_is_dead_lettered_then_replayed_after_the_fix(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    refresher = make_refresher(max_deliveries=2, claim_idle_ms=20)
    redis_client.set(state_key("broken"), b"not a feature state")
    bad = event("broken", "i1", 1_718_000_000.0, weight=2.0)
    good = event("healthy", "i1", 1_718_000_000.0)
    (bad_id, _) = append_events(redis_client, [bad, good], shards=1, maxlen=10_000)

    first = run_once(refresher)  # the batch fails, then user by user: only "broken" fails

    assert [e.event.user_id for e in first.applied] == ["healthy"]
    assert redis_client.xpending(STREAM, "refresh")["pending"] == 1
    assert count_dead_letters(redis_client) == 0
    wait_until(lambda: refresher.claim() > 0)  # second delivery: fails again, dead-lettered

    (letter,) = list_dead_letters(redis_client)
    assert letter.entry_id == bad_id and letter.deliveries == 2
    assert "ValueError" in letter.reason and letter.fields["user_id"] == "broken"
    assert redis_client.xpending(STREAM, "refresh")["pending"] == 0

    redis_client.delete(state_key("broken"))  # the fix
    moved = replay(redis_client, ids=[letter.dead_id], shards=1, maxlen=10_000)
    assert [dead_id for dead_id, _ in moved] == [letter.dead_id]
    run_once(refresher)

    assert count_dead_letters(redis_client) == 0
    state = stored_state(redis_client, "broken")
    assert state is not None and state.count == 1 and state.weight_sum == 2.0
    assert state.mass.tolist() == replay_once(None, [bad], encoders["v1"]).mass.tolist()


def test_a_stream_entry_dead_lettered_twice_is_replayed_once(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    redis_client.set(state_key("twice"), b"garbage")
    (entry_id,) = append_events(
        redis_client, [event("twice", "i1", 1_718_000_000.0)], shards=1, maxlen=10_000
    )
    copy = {
        b"reason": b"a stalled consumer's copy",
        b"stream": STREAM.encode(),
        b"entry_id": entry_id.encode(),
        b"deliveries": b"1",
        b"failed_at": b"0",
        b"event.user_id": b"twice",
        b"event.item_id": b"i1",
        b"event.timestamp": b"1718000000.0",
    }
    first = redis_client.xadd(DEAD_LETTER_KEY, copy).decode()
    redis_client.xadd(DEAD_LETTER_KEY, copy)
    redis_client.xadd(DEAD_LETTER_KEY, {**copy, b"entry_id": b"1-1"})

    moved = replay(redis_client, ids=[first], shards=1, maxlen=10_000)

    assert len(moved) == 1 and count_dead_letters(redis_client) == 1
    assert redis_client.xlen(STREAM) == 2


def test_replay_refuses_ids_that_are_not_stream_ids(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="not dead-letter ids"):
        replay(redis_client, ids=["abc"], shards=1, maxlen=10_000)


def test_the_cli_lists_and_replays_dead_letters(
    redis_client: redis.Redis,
    redis_url: str,
    encoders: dict[str, Encoder],
    make_refresher: RefresherFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENCODER_REDIS_URL", redis_url)
    get_settings.cache_clear()
    redis_client.xadd(STREAM, {**GOOD, b"timestamp": b"yesterday"})
    run_once(make_refresher())
    runner = CliRunner()
    try:
        listed = runner.invoke(app, ["deadletters", "list"])
        replayed = runner.invoke(app, ["deadletters", "replay", "--all"])
        refused = runner.invoke(app, ["deadletters", "replay"])
    finally:
        get_settings.cache_clear()

    assert listed.exit_code == 0, listed.output
    assert "1 dead letter(s)" in listed.output and "field timestamp" in listed.output
    assert '"timestamp":"yesterday"' in listed.output
    assert replayed.exit_code == 0 and "replayed 1 dead letter(s)" in replayed.output
    assert refused.exit_code == 2
    # Still malformed: the refresher refuses it again, with the same reason.
    run_once(make_refresher())
    (letter,) = list_dead_letters(redis_client)
    assert letter.field == "timestamp"
