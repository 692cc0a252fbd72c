"""``refresh --processes N``: shards split over pinned processes, each event applied once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis

from encoder_service.data.contract import Event
from encoder_service.encoder import Encoder
from encoder_service.events import append_events, stream_for, stream_keys
from encoder_service.refresher.supervisor import assign_shards
from encoder_service.training.pipeline import TrainedVersion
from tests.refresher.conftest import (
    assert_same_state,
    drained,
    expected_embedding,
    replay_once,
    repo_root,
    stored_embedding,
    stored_state,
    wait_until,
)

SHARDS = 4


def test_shards_are_split_round_robin_and_never_left_without_a_process() -> None:
    assert assign_shards(4, (), 2) == [(0, 2), (1, 3)]
    assert assign_shards(8, (5, 1, 3), 3) == [(1,), (3,), (5,)]
    assert assign_shards(3, (), 1) == [(0, 1, 2)]
    with pytest.raises(ValueError, match="needs at least 3 shards"):
        assign_shards(2, (), 3)


def test_processes_each_read_their_own_shards_and_apply_every_event_once(
    redis_client: redis.Redis,
    redis_url: str,
    encoders: dict[str, Encoder],
    trained: TrainedVersion,
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(4)
    users = list(trained.user_ids[:60]) + ["proc-new-1", "proc-new-2"]
    before = {u: stored_state(redis_client, u) for u in users}
    events = [
        Event(
            user_id=users[int(rng.integers(len(users)))],
            item_id=f"item-{int(rng.integers(100))}",
            timestamp=1_718_000_000.0 + float(rng.uniform(0, 86_400)),
            weight=float(rng.choice([0.5, 2.0])),
        )
        for _ in range(600)
    ]
    append_events(redis_client, events, shards=SHARDS, maxlen=100_000)
    env = {
        **os.environ,
        "ENCODER_REDIS_URL": redis_url,
        "ENCODER_STREAM_SHARDS": str(SHARDS),
        "ENCODER_BATCH_MAX_EVENTS": "64",
        "ENCODER_BLOCK_MS": "100",
    }
    command = [sys.executable, "-m", "encoder_service.refresher.cli", "refresh"]
    command += ["--processes", "2", "--consumer", "pinned", "--metrics-port", "0"]
    with open(tmp_path / "refresh.log", "wb") as log:
        parent = subprocess.Popen(command, cwd=repo_root(), env=env, stdout=log, stderr=log)
    try:
        wait_until(
            lambda: _groups_exist(redis_client) and drained(redis_client, stream_keys(SHARDS)),
            timeout=60,
        )
    finally:
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=60)
    assert code == 0, (tmp_path / "refresh.log").read_text()

    for stream in stream_keys(SHARDS):
        consumers = redis_client.xinfo_consumers(stream, "refresh")
        shard = int(stream.split("{")[1].rstrip("}"))
        assert [c["name"].decode() for c in consumers] == [f"pinned-{shard % 2}"]
    for user in users:
        mine = [e for e in events if e.user_id == user]
        if not mine:
            continue
        expected = replay_once(before[user], mine, encoders["v1"])
        assert_same_state(stored_state(redis_client, user), expected)
        stored = stored_embedding(redis_client, "v1", user)
        assert stored is not None
        # Several batches per user, each storing float32 sums: close, not bit-equal.
        expected_vector = expected_embedding(encoders["v1"], expected)
        np.testing.assert_allclose(stored, expected_vector, rtol=1e-3, atol=1e-3)
    assert {stream_for(u, SHARDS) for u in users} == set(stream_keys(SHARDS))


def _groups_exist(client: redis.Redis) -> bool:
    return all(client.xinfo_groups(stream) for stream in stream_keys(SHARDS))


def test_more_processes_than_shards_is_refused_naming_the_setting(redis_url: str) -> None:
    env = {**os.environ, "ENCODER_REDIS_URL": redis_url, "ENCODER_STREAM_SHARDS": "1"}
    command = [sys.executable, "-m", "encoder_service.refresher.cli", "refresh"]
    done = subprocess.run(
        [*command, "--processes", "2", "--metrics-port", "0"],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ENCODER_STREAM_SHARDS" in done.stderr
