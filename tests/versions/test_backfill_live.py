"""Publishing a version from live states while the refresher applies events loses nothing for
the new version: real refresher thread, real producer thread, real Valkey."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from encoder_service.data.contract import Event
from encoder_service.data.synthetic import generate
from encoder_service.encoder import Encoder, ModelArtifacts, SchemaHashMismatchError
from encoder_service.events import append_events, stream_keys
from encoder_service.features.state import FeatureState
from encoder_service.publish import publish_from_live_states, publish_version
from encoder_service.refresher.consumer import Refresher, RefresherConfig
from encoder_service.refresher.models import LiveVersions
from encoder_service.registry import Registry
from encoder_service.store import EmbeddingStore, decode_embedding
from encoder_service.training.pipeline import TrainedVersion, train_version
from encoder_service.training.train import TrainConfig

DIM = 16
STREAMS = stream_keys(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedVersion:
    return train_version(
        generate(400, seed=3),
        version="v1",
        out_dir=tmp_path_factory.mktemp("models"),
        config=TrainConfig(embedding_dim=DIM, epochs=2, batch_size=128, seed=3),
        item_vector_dim=8,
        progress=False,
    )


def _as(artifacts: ModelArtifacts, version: str, **changes: object) -> ModelArtifacts:
    manifest = {**artifacts.manifest, "version": version, **changes}
    return ModelArtifacts(manifest=manifest, model=artifacts.model, catalog=artifacts.catalog)


def _config() -> RefresherConfig:
    return RefresherConfig(
        shards=1,
        group="refresh",
        consumer="c1",
        batch_max_events=64,
        batch_max_wait_ms=5,
        block_ms=50,
        claim_idle_ms=30_000,
        max_deliveries=3,
        idempotency_ttl=3600,
        maxlen=1_000_000,
    )


def _drained(client: redis.Redis) -> bool:
    groups = client.xinfo_groups(STREAMS[0])
    return bool(groups) and groups[0]["lag"] == 0 and groups[0]["pending"] == 0


def test_events_during_the_backfill_end_up_in_the_new_version(
    redis_client: redis.Redis, trained: TrainedVersion
) -> None:
    base = trained.artifacts()
    publish_version(redis_client, base, trained.user_ids, trained.states, progress=False)
    versions = LiveVersions(redis_client, poll_seconds=0.5)
    refresher = Refresher(redis_client, _config(), versions)
    stop_refresher, stop_producer = threading.Event(), threading.Event()
    hot_users = trained.user_ids[::7]
    sent = 0

    def produce() -> None:
        nonlocal sent
        t = 1_750_000_000.0
        while not stop_producer.is_set():
            batch = [
                Event(user_id=u, item_id=f"live-{sent + i}", timestamp=t + sent + i)
                for i, u in enumerate(hot_users[sent % 5 :: 5])
            ]
            batch.append(Event(user_id=f"newcomer-{sent}", item_id="live", timestamp=t + sent))
            append_events(redis_client, batch, shards=1, maxlen=1_000_000)
            sent += len(batch)
            time.sleep(0.005)

    threads = [
        threading.Thread(target=refresher.run, args=(stop_refresher,)),
        threading.Thread(target=produce),
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)  # the refresher is applying events before the publish starts
        report = publish_from_live_states(
            redis_client, _as(base, "v2"), batch_size=16, progress=False, settle_seconds=1.2
        )
        time.sleep(0.3)  # and keeps going after it: both versions are kept fresh
        stop_producer.set()
        threads[1].join()
        deadline = time.monotonic() + 30
        while not _drained(redis_client):
            assert time.monotonic() < deadline, "the refresher did not drain the stream"
            time.sleep(0.05)
    finally:
        stop_producer.set()
        stop_refresher.set()
        for thread in threads:
            thread.join()

    assert sent > 200 and report.late_users > 0
    store = EmbeddingStore(redis_client)
    users = sorted(store.iter_state_users())
    assert len(users) > len(trained.user_ids)  # the newcomers have states too
    states = [FeatureState.from_bytes(raw) for raw in store.read_states(users)]  # type: ignore[arg-type]
    for version in ("v1", "v2"):
        expected = Encoder(_as(base, version)).encode_states(states)
        raws = store.read_embeddings(version, users)
        missing = [u for u, raw in zip(users, raws, strict=True) if raw is None]
        assert missing == [], f"{version}: no embedding for {missing[:5]}"
        stored = np.stack([decode_embedding(raw, DIM) for raw in raws])  # type: ignore[arg-type]
        fresh = np.isclose(stored, expected, atol=1e-5).all(1)
        stale = [u for u, ok in zip(users, fresh, strict=True) if not ok]
        assert stale == [], f"{version}: embeddings not of the current state for {stale[:5]}"
    assert Registry(redis_client).get("v2")["status"] == "shadow"  # type: ignore[index]


def test_a_model_built_for_another_schema_is_refused_before_anything_is_written(
    redis_client: redis.Redis, trained: TrainedVersion, tmp_path: Path
) -> None:
    base = trained.artifacts()
    publish_version(redis_client, base, trained.user_ids, trained.states, progress=False)
    forged = _as(base, "v2", schema_hash="sha256:" + "0" * 64)
    with pytest.raises(SchemaHashMismatchError, match="retrain the model"):
        publish_from_live_states(redis_client, forged, progress=False, settle_seconds=0)
    assert Registry(redis_client).get("v2") is None
    assert EmbeddingStore(redis_client).count_embeddings("v2") == 0
    # The refresher refuses it too, with the reason, and keeps refreshing the others.
    Registry(redis_client).register(forged.manifest, forged.model, forged.catalog)
    versions = LiveVersions(redis_client, poll_seconds=60)
    versions.reload()
    assert sorted(versions.encoders) == ["v1"]
    assert "retrain the model" in versions.refused["v2"]


def _rotated_catalogue(base: ModelArtifacts, version: str) -> tuple[ModelArtifacts, Any, Any]:
    """``base`` as ``version`` whose catalogue rotates the item vectors (a linear change)."""
    from encoder_service.features.catalog import ItemCatalog

    old = ItemCatalog.from_bytes(base.catalog)
    rotation, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(old.dim, old.dim)))
    new = ItemCatalog(old.item_ids, old.categories, old.vectors @ rotation.astype(np.float32))
    artifacts = ModelArtifacts(
        manifest={**base.manifest, "version": version, "catalog_hash": new.hash},
        model=base.model,
        catalog=new.to_bytes(),
    )
    return artifacts, old, new


def test_a_version_with_a_new_item_catalogue_keeps_existing_users_item_history(
    redis_client: redis.Redis, trained: TrainedVersion
) -> None:
    """v2's catalogue rotates v1's item vectors; publishing v2 from the live states must give
    every user the item sums an offline build with v2's catalogue gives, not an empty taste."""
    from encoder_service.features.build import build_states

    base = trained.artifacts()
    publish_version(redis_client, base, trained.user_ids, trained.states, progress=False)
    v2, old, new = _rotated_catalogue(base, "v2")
    publish_from_live_states(redis_client, v2, progress=False, settle_seconds=0)

    user_ids, offline = build_states(generate(400, seed=3), {old.hash: old, new.hash: new})
    store = EmbeddingStore(redis_client)
    expected = Encoder(v2).encode_states(offline)
    states = store.read_states(user_ids)
    embeddings = store.read_embeddings("v2", user_ids)
    with_history = 0
    for state, blob, stored, vector in zip(offline, states, embeddings, expected, strict=True):
        assert blob is not None and stored is not None
        if state.count:
            with_history += 1
            np.testing.assert_allclose(
                FeatureState.from_bytes(blob).item_sums[new.hash],
                state.item_sums[new.hash],
                rtol=1e-3,
                atol=1e-4,
            )
        np.testing.assert_allclose(decode_embedding(stored, DIM), vector, atol=1e-4)
    assert with_history > 300


def test_the_refresher_carries_item_history_over_when_a_new_catalogue_goes_live(
    redis_client: redis.Redis, trained: TrainedVersion
) -> None:
    """v2 registered without a backfill: a user's first event afterwards must add onto their
    carried-over history under v2's catalogue, as an offline build of the whole history does."""
    from encoder_service.features.build import build_states

    base = trained.artifacts()
    publish_version(redis_client, base, trained.user_ids, trained.states, progress=False)
    v2, old, new = _rotated_catalogue(base, "v2")
    Registry(redis_client).register(v2.manifest, v2.model, v2.catalog)
    users = trained.user_ids[:20]
    events = [
        Event(user_id=u, item_id=old.item_ids[k], timestamp=1_750_000_000.0 + k)
        for k, u in enumerate(users)
    ]
    append_events(redis_client, events, shards=1, maxlen=1_000_000)
    stop = threading.Event()
    refresher = threading.Thread(
        target=Refresher(redis_client, _config(), LiveVersions(redis_client, poll_seconds=60)).run,
        args=(stop,),
    )
    refresher.start()
    try:
        deadline = time.monotonic() + 30
        while not _drained(redis_client):
            assert time.monotonic() < deadline, "the refresher did not drain the stream"
            time.sleep(0.05)
    finally:
        stop.set()
        refresher.join()

    user_ids, offline = build_states(generate(400, seed=3), {old.hash: old, new.hash: new})
    by_user = dict(zip(user_ids, offline, strict=True))
    blobs = EmbeddingStore(redis_client).read_states(users)
    for event, blob in zip(events, blobs, strict=True):
        expected = by_user[event.user_id]
        expected.apply(event, {old.hash: old, new.hash: new})
        assert blob is not None
        np.testing.assert_allclose(
            FeatureState.from_bytes(blob).item_sums[new.hash],
            expected.item_sums[new.hash],
            rtol=1e-3,
            atol=1e-4,
        )
