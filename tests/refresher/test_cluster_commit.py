"""The refresher's commit on a real 3-master Redis Cluster: one batch whose users span every
master applies each event exactly once, and a crash after the users' slots committed but before
the XACK (the window a per-slot commit opens) is resolved on restart by acknowledging the
redelivered entries without applying them again.

Runs against the suite's Redis: under ``pytest --redis-cluster -m cluster`` that is the
cluster, and the test checks that the batch really spanned all three masters.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from encoder_service import cluster
from encoder_service.data.contract import Event
from encoder_service.encoder import Encoder
from encoder_service.events import append_events
from encoder_service.refresher import commit
from encoder_service.refresher.commit import CommitResult
from encoder_service.store import state_key
from encoder_service.training.pipeline import TrainedVersion
from tests.refresher.conftest import (
    RefresherFactory,
    assert_same_state,
    event,
    expected_embedding,
    pending_count,
    replay_once,
    stored_embedding,
    stored_state,
)

NEW_USERS = 90
EVENTS_PER_USER = 3


def _masters_of(client: redis.Redis, users: list[str]) -> int:
    """How many nodes own the users' slots (1 on a single server)."""
    if not cluster.is_cluster(client):
        return 1
    nodes = client.nodes_manager  # type: ignore[attr-defined]
    return len({nodes.get_node_from_slot(cluster.slot_of(state_key(u))).name for u in users})


def _workload(trained: TrainedVersion) -> list[Event]:
    """Three events for each of 60 published users and 90 new ones, in id (time) order."""
    users = list(trained.user_ids[:60]) + [f"new-{i}" for i in range(NEW_USERS)]
    return [
        event(u, f"item-{(7 * j + k) % 200}", 1_718_000_000.0 + 60 * k + j, weight=1.0 + k)
        for k in range(EVENTS_PER_USER)
        for j, u in enumerate(users)
    ]


@pytest.mark.parametrize("crash_before_ack", [False, True])
def test_a_batch_spanning_every_master_applies_each_event_once(
    redis_client: redis.Redis,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    make_refresher: RefresherFactory,
    crash_before_ack: bool,
) -> None:
    refresher = make_refresher(batch_max_events=10_000)
    events = _workload(trained)
    users = list(dict.fromkeys(e.user_id for e in events))
    before = {u: stored_state(redis_client, u) for u in users}
    if cluster.is_cluster(redis_client):
        assert _masters_of(redis_client, users) == 3
    append_events(redis_client, events, shards=1, maxlen=100_000)
    entries = refresher.read_new()
    assert len(entries) == len(events)

    if crash_before_ack:
        # What a cluster commit does before its XACK: every user's slot committed by its own
        # compare-and-set. The process then dies: the entries stay pending.
        batch = refresher._validate(entries, {})
        written = CommitResult()
        commit._commit_per_slot(
            redis_client,
            users,
            batch.events,
            encoders,
            {e.catalog_id: e.catalog for e in encoders.values()},
            {},
            3600,
            written,
        )
        assert len(written.applied) == len(events)
        assert pending_count(redis_client, ["events:{0}"]) == len(events)
        # The restarted refresher (same consumer name) drains its own pending entries:
        # every one is acknowledged as already applied.
        restarted = make_refresher(batch_max_events=10_000)
        assert restarted.drain_own_pending() == len(events)
    else:
        result = refresher.process(entries)
        assert len(result.applied) == len(events) and not result.duplicates
        assert sorted(result.users) == sorted(users)

    assert pending_count(redis_client, ["events:{0}"]) == 0
    encoder = encoders["v1"]
    for user in users:
        expected = replay_once(before[user], [e for e in events if e.user_id == user], encoder)
        assert_same_state(stored_state(redis_client, user), expected)
        for version, live in encoders.items():
            np.testing.assert_allclose(
                stored_embedding(redis_client, version, user),
                expected_embedding(live, expected),
                rtol=1e-5,
                atol=1e-5 if live.dtype == "float32" else 2e-3,
            )
