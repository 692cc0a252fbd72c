"""Stage 1 end to end on a real Valkey: data -> train -> ONNX -> publish -> stored bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from encoder_service.data.synthetic import generate
from encoder_service.encoder import Encoder
from encoder_service.publish import publish_version
from encoder_service.registry import Registry, SchemaMismatchError
from encoder_service.store import EmbeddingStore, decode_embedding
from encoder_service.training.pipeline import TrainedVersion, train_version
from encoder_service.training.train import TrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedVersion:
    dataset = generate(600, seed=7)
    config = TrainConfig(embedding_dim=16, epochs=4, batch_size=128, seed=7)
    return train_version(
        dataset,
        version="v1",
        out_dir=tmp_path_factory.mktemp("models"),
        config=config,
        item_vector_dim=8,
        progress=False,
    )


def test_version_folder_holds_model_catalog_and_manifest(trained: TrainedVersion) -> None:
    names = sorted(p.name for p in trained.folder.iterdir())
    assert names == ["catalog.npz", "encoder.onnx", "manifest.json"]
    manifest = trained.manifest
    assert manifest["embedding_dim"] == 16
    assert manifest["training"]["n_users"] == 600
    assert manifest["metrics"]["onnx_parity_max_abs_diff"] <= 1e-4
    assert manifest["schema_hash"].startswith("sha256:")


def test_published_bytes_decode_to_exactly_the_onnx_output(
    trained: TrainedVersion, redis_client: redis.Redis
) -> None:
    artifacts = trained.artifacts()
    report = publish_version(
        redis_client, artifacts, trained.user_ids, trained.states, progress=False
    )
    assert report.users == 600 and report.active == "v1"
    encoder = Encoder(artifacts)
    sample = np.random.default_rng(0).choice(len(trained.user_ids), 50, replace=False)
    users = [trained.user_ids[i] for i in sample]
    expected = encoder.encode_features(trained.features[sample])
    stored = EmbeddingStore(redis_client).read_embeddings("v1", users)
    for row, raw in zip(expected, stored, strict=True):
        assert raw is not None
        vector = decode_embedding(raw, 16, "float32")
        assert vector.tobytes() == row.tobytes()
    assert Registry(redis_client).get("v1")["status"] == "active"


def test_republishing_the_same_version_is_idempotent(
    trained: TrainedVersion, redis_client: redis.Redis
) -> None:
    artifacts = trained.artifacts()
    for _ in range(2):
        publish_version(redis_client, artifacts, trained.user_ids, trained.states, progress=False)
    assert EmbeddingStore(redis_client).count_embeddings("v1") == 600
    assert [m["version"] for m in Registry(redis_client).list()] == ["v1"]


def test_a_version_with_another_schema_is_refused_and_nothing_changes(
    trained: TrainedVersion, redis_client: redis.Redis, tmp_path: Path
) -> None:
    publish_version(
        redis_client, trained.artifacts(), trained.user_ids, trained.states, progress=False
    )
    before = EmbeddingStore(redis_client).read_embeddings("v1", trained.user_ids[:20])
    other = train_version(
        generate(200, seed=8, n_categories=5),
        version="v1",
        out_dir=tmp_path,
        config=TrainConfig(embedding_dim=16, epochs=1, seed=1),
        item_vector_dim=8,
        progress=False,
    )
    assert other.manifest["schema_hash"] != trained.manifest["schema_hash"]
    with pytest.raises(SchemaMismatchError, match="new version id"):
        publish_version(
            redis_client, other.artifacts(), other.user_ids, other.states, progress=False
        )
    assert EmbeddingStore(redis_client).read_embeddings("v1", trained.user_ids[:20]) == before


def test_a_failed_publish_leaves_the_active_version_untouched(
    trained: TrainedVersion, redis_client: redis.Redis, tmp_path: Path
) -> None:
    publish_version(
        redis_client, trained.artifacts(), trained.user_ids, trained.states, progress=False
    )
    before = EmbeddingStore(redis_client).read_embeddings("v1", trained.user_ids[:20])
    artifacts = trained.artifacts()
    manifest = {**artifacts.manifest, "version": "v2"}
    broken = type(artifacts)(manifest=manifest, model=artifacts.model, catalog=artifacts.catalog)
    states = list(trained.states)
    states[300] = None  # an unencodable state half-way through the publish
    with pytest.raises(AttributeError):
        publish_version(
            redis_client, broken, trained.user_ids, states, batch_size=100, progress=False
        )
    registry = Registry(redis_client)
    assert registry.get("v2") is None
    assert registry.active() == "v1"
    assert EmbeddingStore(redis_client).count_embeddings("v2") == 0
    assert EmbeddingStore(redis_client).read_embeddings("v1", trained.user_ids[:20]) == before
