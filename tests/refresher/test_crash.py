"""Crash safety: a refresher process SIGKILLed at random points while events flow, then
restarted, ends with every event applied exactly once and nothing pending.

A few thousand events over a few hundred users, so that a batch of 64 holds mostly distinct
users and a kill lands in a commit touching many of them, not in the coalescing of one.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import redis

from encoder_service.data.contract import Event
from encoder_service.encoder import Encoder
from encoder_service.events import append_events, stream_for, stream_keys
from encoder_service.refresher.commit import parse_id
from encoder_service.refresher.deadletter import count_dead_letters
from encoder_service.training.pipeline import TrainedVersion
from tests.refresher.conftest import (
    assert_same_state,
    consumer_pending,
    consumer_reading,
    crash_workload,
    drained,
    expected_embedding,
    last_ids,
    pending_count,
    refresher_process,
    replay_once,
    stored_embedding,
    stored_state,
    wait_until,
)

SHARDS = 2
KILLS = 12
EVENTS = 6000
NEW_USERS = 60
BURST = 40
BURST_EVERY_S = 0.1
"""400 events/s: the stream keeps flowing through the ~12 restarts (a process starts in about a
second), so most kills find a batch in flight."""


def _refresher(
    redis_url: str, consumer: str, log: Path
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    env = {
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_STREAM_SHARDS": str(SHARDS),
        "ENCODER_CLAIM_IDLE_MS": "300",
        "ENCODER_MAX_DELIVERIES": "100",  # kills must never turn a valid event into a dead letter
        "ENCODER_BATCH_MAX_EVENTS": "64",
        "ENCODER_BATCH_MAX_WAIT_MS": "5",
        "ENCODER_BLOCK_MS": "100",
    }
    return refresher_process(env, consumer, log)


@pytest.mark.slow
def test_sigkill_at_random_points_neither_loses_nor_duplicates_an_event(
    redis_client: redis.Redis,
    redis_url: str,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    tmp_path: Path,
) -> None:
    events = crash_workload(trained, seed=11, events=EVENTS, new_users=NEW_USERS)
    users = sorted({e.user_id for e in events})
    before = {u: stored_state(redis_client, u) for u in users}
    assert len(users) >= 300
    ids: list[str] = []
    produced = threading.Event()

    def produce() -> None:
        """Bursts, so that a refresher spends a good part of its time mid-batch."""
        for start in range(0, len(events), BURST):
            burst = events[start : start + BURST]
            ids.extend(append_events(redis_client, burst, shards=SHARDS, maxlen=10**6))
            time.sleep(BURST_EVERY_S)
        produced.set()

    rng = np.random.default_rng(5)
    producer = threading.Thread(target=produce)
    producer.start()
    log = tmp_path / "refresher.log"
    orphaned = []
    # Even runs reuse the name (the restart drains its own pending entries); odd runs are new
    # consumers, whose orphans a later one claims.
    for run in range(KILLS):
        consumer = "crashy" if run % 2 == 0 else f"crashy-{run}"
        started = time.monotonic()
        with _refresher(redis_url, consumer, log) as process:
            wait_until(
                lambda c=consumer, t=started: consumer_reading(
                    redis_client, c, t, stream_keys(SHARDS)
                ),
                timeout=30,
            )
            # Kill somewhere in or just after a batch: between XREADGROUP and EXEC is the
            # interesting window, and a uniformly random moment would mostly find it idle.
            # Once the producer is done there may be nothing left to catch mid-batch: the kill
            # then lands at a random moment of the drain or of idling.
            wait_until(
                lambda c=consumer: (
                    consumer_pending(redis_client, c, stream_keys(SHARDS)) > 0 or produced.is_set()
                ),
                timeout=30,
            )
            time.sleep(float(rng.uniform(0, 0.02 if not produced.is_set() else 0.3)))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            orphaned.append(consumer_pending(redis_client, consumer, stream_keys(SHARDS)))
    started = time.monotonic()
    with _refresher(redis_url, "crashy", log) as process:
        wait_until(
            lambda: consumer_reading(redis_client, "crashy", started, stream_keys(SHARDS)),
            timeout=30,
        )
        producer.join()  # the last process runs while the rest of the log streams in
        wait_until(lambda: drained(redis_client, stream_keys(SHARDS)), timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()[-3000:]

    events = events[: len(ids)]
    assert len(ids) == len(events)
    by_user: dict[str, list[tuple[str, Event]]] = {}
    for i, e in zip(ids, events, strict=True):
        by_user.setdefault(e.user_id, []).append((i, e))
    applied = sum(
        stored_state(redis_client, u).count - (before[u].count if before[u] else 0)  # type: ignore[union-attr]
        for u in by_user
    )
    pending = pending_count(redis_client, stream_keys(SHARDS))
    print(
        f"\ncrash test: {len(events)} events, {len(by_user)} users, {len(orphaned)} kills "
        f"({sum(1 for o in orphaned if o)} mid-batch, {sum(orphaned)} entries orphaned), "
        f"{applied} applied, {pending} pending, {count_dead_letters(redis_client)} dead letters"
    )
    assert len(orphaned) >= 10 and len(by_user) >= 300
    assert sum(orphaned) > 0, "no kill left entries pending: the test proved nothing"
    assert applied == len(events) and pending == 0
    assert count_dead_letters(redis_client) == 0
    for user, mine in by_user.items():
        expected = replay_once(before[user], [e for _, e in mine], encoders["v1"])
        state = stored_state(redis_client, user)
        assert_same_state(state, expected)
        newest = max((i for i, _ in mine), key=parse_id)
        assert last_ids(redis_client, user) == {stream_for(user, SHARDS): newest}
        for version, encoder in encoders.items():
            stored = stored_embedding(redis_client, version, user)
            np.testing.assert_allclose(
                stored, expected_embedding(encoder, expected), rtol=1e-3, atol=1e-3
            )
