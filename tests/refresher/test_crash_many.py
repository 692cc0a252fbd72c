"""Many refreshers: three refresher processes in one consumer group over four stream shards,
SIGKILLed at random points while events flow and restarted, end with every event applied once,
each user's events applied in order, and nothing pending.

This is the Deployment of ``deploy/k8s/refresher.yaml``: every process reads every shard (no
``--consume``), so the processes compete for the same users and exactly-once rests on the commit
rules alone (skip what is applied, borrow older pending entries, WATCH), not on pinning.

A restart gets the same consumer name or a new one at random, because a Deployment does both:
the consumer name is the pod name, a process that dies inside its pod is restarted by the kubelet
in the same pod (same name: it drains its own pending entries from id 0), and a pod that is lost
(node failure, eviction, rollout) is replaced by a pod with a new random name (the old name never
comes back: only the survivors' XAUTOCLAIM after ``ENCODER_CLAIM_IDLE_MS`` recovers its entries).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from encoder_service import cluster
from encoder_service.data.contract import Event
from encoder_service.encoder import Encoder
from encoder_service.events import append_events, stream_for, stream_keys
from encoder_service.features.state import FeatureState
from encoder_service.refresher.commit import parse_id
from encoder_service.refresher.deadletter import count_dead_letters
from encoder_service.store import decode_meta, meta_key, state_key
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

SHARDS = 4
REFRESHERS = 3
KILLS = 12
EVENTS = 5000
NEW_USERS = 60
BURST = 50
BURST_EVERY_S = 0.1
"""500 events/s for ten seconds: the kills (one every 0.3-1 s) land while events flow."""
CLAIM_IDLE_MS = 500
SNAPSHOT_EVERY_S = 0.25
STREAMS = stream_keys(SHARDS)
CLAIMED = re.compile(rb"claimed (\d+) idle entries")
RESUMED = re.compile(rb"resolved (\d+) entries left pending by a previous run")


@dataclass
class _Refresher:
    """One run of a refresher slot: a process, its consumer name and its metrics port."""

    slot: int
    consumer: str
    process: subprocess.Popen[bytes]
    port: int
    started: float
    counts: Counter[str] | None = None
    """Its counters, scraped shortly before it was killed (what it applied in its last moments
    is missing) or when it was stopped."""


@dataclass
class _Kill:
    slot: int
    consumer: str
    orphaned: int
    same_name: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> Counter[str]:
    """The refresher's event outcomes, borrowed entries and commit conflicts, from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "encoder_refresh_events_total":
                counts[sample.labels["outcome"]] += int(sample.value)
            elif sample.name in (
                "encoder_refresh_borrowed_total",
                "encoder_refresh_commit_conflicts_total",
            ):
                counts[sample.name.split("_")[2]] += int(sample.value)
    return counts


def _start(stack: ExitStack, redis_url: str, slot: int, consumer: str, logs: Path) -> _Refresher:
    env = {
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_STREAM_SHARDS": str(SHARDS),
        "ENCODER_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
        "ENCODER_MAX_DELIVERIES": "100",  # kills must never turn a valid event into a dead letter
        "ENCODER_BATCH_MAX_EVENTS": "64",
        "ENCODER_BATCH_MAX_WAIT_MS": "5",
        "ENCODER_BLOCK_MS": "100",
    }
    port = _free_port()
    log = logs / f"refresher-{slot}.log"
    process = stack.enter_context(refresher_process(env, consumer, log, metrics_port=port))
    return _Refresher(slot, consumer, process, port, time.monotonic())


def _logged(logs: Path, pattern: re.Pattern[bytes]) -> int:
    return sum(int(n) for f in logs.glob("*.log") for n in pattern.findall(f.read_bytes()))


def _snapshots(
    client: redis.Redis, users: list[str], stop: threading.Event
) -> list[tuple[str, str, str, int, dict]]:
    """While the run lasts, read every user's state and meta now and then, each user atomically
    (one MGET; on a cluster one per slot, and a user's keys share one).

    Returns ``(user, stream, last applied id, events applied, profile)`` per user seen: what
    the per-user ordering check compares with the stream.
    """
    seen: list[tuple[str, str, str, int, dict]] = []
    keys = [k for u in users for k in (state_key(u), meta_key(u))]
    while not stop.wait(SNAPSHOT_EVERY_S):
        values = cluster.mget(client, keys)
        for k, user in enumerate(users):
            state, meta = values[2 * k], values[2 * k + 1]
            if state is None or meta is None:
                continue
            decoded = FeatureState.from_bytes(state)
            for stream, last in decode_meta(meta)[1].items():
                seen.append((user, stream, last, decoded.count, dict(decoded.profile)))
    return seen


@pytest.mark.slow
def test_three_refreshers_killed_at_random_apply_every_event_once_and_in_order(
    redis_client: redis.Redis,
    redis_url: str,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    events = crash_workload(trained, seed=23, events=EVENTS, new_users=NEW_USERS)
    users = sorted({e.user_id for e in events})
    before = {u: stored_state(redis_client, u) for u in users}
    assert len(users) >= 300
    produced = threading.Event()

    def produce() -> None:
        for start in range(0, len(events), BURST):
            append_events(redis_client, events[start : start + BURST], shards=SHARDS, maxlen=10**6)
            time.sleep(BURST_EVERY_S)
        produced.set()

    observing = threading.Event()
    snapshots: list[tuple[str, str, str, int, dict]] = []
    observer = threading.Thread(
        target=lambda: snapshots.extend(_snapshots(redis_client, users, observing)), daemon=True
    )
    rng = np.random.default_rng(5)
    kills: list[_Kill] = []
    done: list[_Refresher] = []
    with ExitStack() as stack:
        stack.callback(observing.set)  # a failure must not leave the observer running
        live = [
            _start(stack, redis_url, slot, f"refresher-{slot}-0", tmp_path)
            for slot in range(REFRESHERS)
        ]
        for r in live:
            wait_until(
                lambda r=r: consumer_reading(redis_client, r.consumer, r.started, STREAMS),
                timeout=60,
            )
        producer = threading.Thread(target=produce)
        producer.start()
        observer.start()
        while len(kills) < KILLS or producer.is_alive():
            time.sleep(float(rng.uniform(0.3, 1.0)))
            ready = [
                r for r in live if consumer_reading(redis_client, r.consumer, r.started, STREAMS)
            ]
            if not ready:
                continue
            victim = ready[int(rng.integers(len(ready)))]
            # Its counters first: scraping between a batch's read and the kill would mostly let
            # the batch finish. Then kill in or just after a batch while events flow (a
            # uniformly random moment would mostly find it idle); afterwards at a random moment.
            victim.counts = _scrape(victim.port)
            deadline = time.monotonic() + 2
            while not (
                produced.is_set()
                or consumer_pending(redis_client, victim.consumer, STREAMS) > 0
                or time.monotonic() > deadline
            ):
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0, 0.01)))
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            orphaned = consumer_pending(redis_client, victim.consumer, STREAMS)
            same_name = bool(rng.random() < 0.5)
            kills.append(_Kill(victim.slot, victim.consumer, orphaned, same_name))
            consumer = victim.consumer if same_name else f"refresher-{victim.slot}-{len(kills)}"
            done.append(victim)
            live[victim.slot] = _start(stack, redis_url, victim.slot, consumer, tmp_path)
        producer.join()
        assert produced.is_set(), "the producer failed"
        # The survivors drain, the dead consumers' entries included (claimed once idle).
        for r in live:
            wait_until(
                lambda r=r: consumer_reading(redis_client, r.consumer, r.started, STREAMS),
                timeout=60,
            )
        wait_until(lambda: drained(redis_client, STREAMS), timeout=60)
        observing.set()
        observer.join()
        for r in live:
            r.counts = _scrape(r.port)
            r.process.send_signal(signal.SIGTERM)
        for r in live:
            assert r.process.wait(timeout=15) == 0, (
                tmp_path / f"refresher-{r.slot}.log"
            ).read_text()[-3000:]
        done += live

    # Every entry is in its user's shard, and the streams hold exactly the events produced.
    appended: dict[str, list[tuple[str, str]]] = {}
    items: dict[str, list[str]] = {}
    for stream in STREAMS:
        for entry_id, fields in redis_client.xrange(stream):
            user = fields[b"user_id"].decode()
            assert stream_for(user, SHARDS) == stream, f"{user} found in {stream}"
            appended.setdefault(user, []).append((stream, entry_id.decode()))
            items.setdefault(user, []).append(fields[b"item_id"].decode())
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    assert sorted(appended) == users
    assert items == {u: [e.item_id for e in mine] for u, mine in by_user.items()}

    assert snapshots, "the observer saw no state"
    # Per-user order: every snapshot shows exactly the user's events up to its last applied id.
    for user, stream, last, count, profile in snapshots:
        assert stream == stream_for(user, SHARDS)
        ids = [parse_id(i) for _, i in appended[user]]
        prefix = sum(1 for i in ids if i <= parse_id(last))
        start = before[user].count if before[user] else 0
        assert count - start == prefix, f"{user} at {last}: {count - start} applied, not {prefix}"
        if profile.get("age") is not None and before[user] is None:
            assert profile["age"] == by_user[user][prefix - 1].profile["age"]

    applied = sum(
        stored_state(redis_client, u).count - (before[u].count if before[u] else 0)  # type: ignore[union-attr]
        for u in users
    )
    pending = pending_count(redis_client, STREAMS)
    per_slot = Counter[int]()
    totals: Counter[str] = Counter()
    for r in done:
        assert r.counts is not None
        per_slot[r.slot] += r.counts["applied"]
        totals += r.counts
    reclaimed = _logged(tmp_path, CLAIMED)
    resumed = _logged(tmp_path, RESUMED)
    elapsed = time.monotonic() - began
    print(
        f"\nmany refreshers: {len(events)} events, {len(users)} users, {SHARDS} shards, "
        f"{REFRESHERS} refreshers, {len(kills)} kills "
        f"({sum(1 for k in kills if k.orphaned)} mid-batch, "
        f"{sum(1 for k in kills if k.same_name)} restarted under the same name), "
        f"{sum(k.orphaned for k in kills)} entries orphaned, {reclaimed} reclaimed by XAUTOCLAIM, "
        f"{resumed} resumed by a same-name restart, {totals['borrowed']} borrowed, "
        f"{totals['conflicts']} commit conflicts, {totals['duplicate']} duplicates skipped; "
        f"applied per refresher "
        + " / ".join(f"{per_slot[s]}" for s in range(REFRESHERS))
        + f" (scraped shortly before each kill: {sum(per_slot.values())} of {applied} applied); "
        f"{pending} pending, {count_dead_letters(redis_client)} dead letters, "
        f"{len(snapshots)} ordering snapshots, {elapsed:.0f} s"
    )
    assert len(kills) >= 10 and len(users) >= 300
    assert sum(k.orphaned for k in kills) > 0, (
        "no kill left entries pending: the test proved nothing"
    )
    assert reclaimed > 0, "no dead consumer's entry was claimed"
    assert applied == len(events) and pending == 0
    assert count_dead_letters(redis_client) == 0
    assert sum(per_slot.values()) <= applied
    assert all(per_slot[s] > 0 for s in range(REFRESHERS))
    for user in users:
        expected = replay_once(before[user], by_user[user], encoders["v1"])
        assert_same_state(stored_state(redis_client, user), expected)
        newest = max(appended[user], key=lambda a: parse_id(a[1]))
        assert last_ids(redis_client, user) == {newest[0]: newest[1]}
        for version, encoder in encoders.items():
            np.testing.assert_allclose(
                stored_embedding(redis_client, version, user),
                expected_embedding(encoder, expected),
                rtol=1e-3,
                atol=1e-3,
            )
