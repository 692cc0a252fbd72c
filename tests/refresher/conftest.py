"""Refresher fixtures: a tiny model trained once per session and published as several versions
into the real test Redis, refreshers wired to it, and the exactly-once replay tests compare to."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis

from encoder_service.data.contract import Event
from encoder_service.data.synthetic import generate
from encoder_service.encoder import Encoder, ModelArtifacts
from encoder_service.features.state import FeatureState
from encoder_service.publish import publish_version
from encoder_service.refresher.commit import CommitResult
from encoder_service.refresher.consumer import Refresher, RefresherConfig
from encoder_service.refresher.models import LiveVersions
from encoder_service.registry import Registry
from encoder_service.store import EmbeddingStore, decode_embedding, decode_meta, meta_key
from encoder_service.training.pipeline import TrainedVersion, train_version
from encoder_service.training.train import TrainConfig

DIM = 16
LIVE = ("v1", "v2")
"""``v1`` active (float32), ``v2`` shadow (float16); ``v0`` is published too, then retired."""


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedVersion:
    return train_version(
        generate(300, seed=7),
        version="v1",
        out_dir=tmp_path_factory.mktemp("models"),
        config=TrainConfig(embedding_dim=DIM, epochs=2, batch_size=128, seed=7),
        item_vector_dim=8,
        progress=False,
    )


def as_version(artifacts: ModelArtifacts, version: str, dtype: str = "float32") -> ModelArtifacts:
    manifest = {**artifacts.manifest, "version": version, "dtype": dtype}
    return ModelArtifacts(manifest=manifest, model=artifacts.model, catalog=artifacts.catalog)


def publish_versions(client: redis.Redis, trained: TrainedVersion) -> dict[str, Encoder]:
    """Publish v0 (then retire it), v1 (active) and v2 (float16); return the live encoders."""
    base = trained.artifacts()
    registry = Registry(client)
    live: dict[str, Encoder] = {}
    for version, dtype in (("v0", "float32"), ("v1", "float32"), ("v2", "float16")):
        artifacts = as_version(base, version, dtype)
        publish_version(
            client,
            artifacts,
            trained.user_ids,
            trained.states,
            features=trained.features,
            activate=version != "v2",
            progress=False,
        )
        if version != "v0":
            live[version] = Encoder(artifacts)
    registry.set_status("v0", "retired", by="tests")
    return live


@pytest.fixture
def encoders(redis_client: redis.Redis, trained: TrainedVersion) -> dict[str, Encoder]:
    """The versions published into a clean database; the live ones' encoders."""
    return publish_versions(redis_client, trained)


def make_config(**overrides: object) -> RefresherConfig:
    values: dict[str, object] = {
        "shards": 1,
        "group": "refresh",
        "consumer": "c1",
        "batch_max_events": 512,
        "batch_max_wait_ms": 20,
        "block_ms": 100,
        "claim_idle_ms": 30_000,
        "max_deliveries": 3,
        "idempotency_ttl": 3600,
        "maxlen": 100_000,
    }
    return RefresherConfig(**{**values, **overrides})  # type: ignore[arg-type]


RefresherFactory = Callable[..., Refresher]


@pytest.fixture
def make_refresher(redis_client: redis.Redis) -> RefresherFactory:
    """``make_refresher(**config overrides)``: versions loaded, groups created."""

    def factory(**overrides: object) -> Refresher:
        versions = LiveVersions(redis_client, poll_seconds=0.1)
        versions.reload()
        refresher = Refresher(redis_client, make_config(**overrides), versions)
        refresher.ensure_groups()
        return refresher

    return factory


def run_once(refresher: Refresher) -> CommitResult:
    """Read whatever is new and process it as one batch."""
    return refresher.process(refresher.read_new())


def event(user: str, item: str, t: float, **extra: object) -> Event:
    return Event(user_id=user, item_id=item, timestamp=t, **extra)  # type: ignore[arg-type]


def stored_state(client: redis.Redis, user: str) -> FeatureState | None:
    (raw,) = EmbeddingStore(client).read_states([user])
    return None if raw is None else FeatureState.from_bytes(raw)


def stored_embedding(client: redis.Redis, version: str, user: str) -> np.ndarray | None:
    (raw,) = EmbeddingStore(client).read_embeddings(version, [user])
    dtype = "float16" if version == "v2" else "float32"
    return None if raw is None else decode_embedding(raw, DIM, dtype)  # type: ignore[arg-type]


def last_ids(client: redis.Redis, user: str) -> dict[str, str]:
    return decode_meta(client.get(meta_key(user)))[1]


def replay_once(
    start: FeatureState | None, events: Iterable[Event], encoder: Encoder
) -> FeatureState:
    """The state applying each event exactly once to ``start`` gives (a copy; start untouched)."""
    state = copy.deepcopy(start) if start is not None else FeatureState()
    for e in events:
        state.apply(e, {encoder.catalog_id: encoder.catalog})
    return state


def expected_embedding(encoder: Encoder, state: FeatureState) -> np.ndarray:
    """What the store must hold: the encoder's output, through the version's dtype."""
    out = encoder.encode_states([state])[0]
    return out.astype(np.float16).astype(np.float32) if encoder.dtype == "float16" else out


def assert_same_state(actual: FeatureState | None, expected: FeatureState) -> None:
    """Equal up to the float32 a stored state keeps; counts and sums of weights exactly."""
    assert actual is not None
    assert actual.count == expected.count
    assert math.isclose(actual.weight_sum, expected.weight_sum, rel_tol=1e-12)
    assert actual.t_first == expected.t_first and actual.t_last == expected.t_last
    assert actual.profile == expected.profile
    np.testing.assert_allclose(actual.mass, expected.mass, rtol=1e-5)
    np.testing.assert_allclose(actual.heatmap, expected.heatmap, rtol=1e-5, atol=1e-9)
    assert actual.categories.keys() == expected.categories.keys()
    for name, values in expected.categories.items():
        np.testing.assert_allclose(actual.categories[name], values, rtol=1e-5, atol=1e-9)
    assert actual.item_sums.keys() == expected.item_sums.keys()
    for key, values in expected.item_sums.items():
        np.testing.assert_allclose(actual.item_sums[key], values, rtol=1e-4, atol=1e-6)
    assert actual.event_types.keys() == expected.event_types.keys()
    assert actual.contexts.keys() == expected.contexts.keys()


def pending_count(client: redis.Redis, streams: Sequence[str], group: str = "refresh") -> int:
    return sum(int(client.xpending(s, group)["pending"]) for s in streams)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@contextmanager
def running(refresher: Refresher) -> Iterator[threading.Thread]:
    """Run ``refresher``'s loop on a thread for the block's length."""
    stop = threading.Event()
    thread = threading.Thread(target=refresher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=10)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def drained(client: redis.Redis, streams: Sequence[str], group: str = "refresh") -> bool:
    """Every entry delivered to the group and acknowledged."""
    for stream in streams:
        (info,) = client.xinfo_groups(stream)
        if info["pending"] or info["lag"] != 0:
            return False
    return True


@contextmanager
def refresher_process(
    settings_env: dict[str, str], consumer: str, log: Path, metrics_port: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """``encoder-service refresh`` as a real process (killable), configured by environment;
    ``metrics_port`` 0 serves no ``/metrics``."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "encoder_service.refresher.cli", "refresh"]
            + ["--consumer", consumer, "--metrics-port", str(metrics_port)],
            cwd=repo_root(),
            env={**os.environ, **settings_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def crash_workload(
    trained: TrainedVersion, *, seed: int, events: int, new_users: int
) -> list[Event]:
    """Events for the published users and ``new_users`` unknown ones, in random order.

    Every event of a new user carries a different profile age, and a state keeps the latest
    profile applied: a user whose events were applied out of order ends with the wrong age.
    """
    rng = np.random.default_rng(seed)
    users = list(trained.user_ids) + [f"crash-new-{k}" for k in range(new_users)]
    out = []
    for _ in range(events):
        user = users[int(rng.integers(len(users)))]
        profile = {"age": float(rng.integers(18, 80))} if user.startswith("crash-new") else {}
        out.append(
            Event(
                user_id=user,
                item_id=f"item-{int(rng.integers(200))}",
                timestamp=1_718_000_000.0 + float(rng.uniform(0, 30 * 86_400)),
                weight=float(rng.choice([0.5, 1.0, 2.0])),
                profile=profile,
            )
        )
    return out


def consumer_reading(
    client: redis.Redis, consumer: str, since: float, streams: Sequence[str], group: str = "refresh"
) -> bool:
    """The process started at ``since`` (monotonic) reads as ``consumer`` on every stream: it is
    past start-up. A restart may reuse a name the group knows, so it must have been seen since.
    """
    for stream in streams:
        try:
            seen = {_name(c["name"]): c["idle"] for c in client.xinfo_consumers(stream, group)}
        except redis.ResponseError:
            return False
        if seen.get(consumer, float("inf")) > (time.monotonic() - since) * 1000:
            return False
    return True


def consumer_pending(
    client: redis.Redis, consumer: str, streams: Sequence[str], group: str = "refresh"
) -> int:
    """Entries delivered to ``consumer`` and not acknowledged, over ``streams``."""
    total = 0
    for stream in streams:
        for row in client.xpending(stream, group)["consumers"]:
            if _name(row["name"]) == consumer:
                total += int(row["pending"])
    return total


def _name(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
