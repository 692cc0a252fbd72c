"""A backfill split over several processes writes what one process writes, registers once, and
can be run again without changing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from encoder_service.cli import app
from encoder_service.data.synthetic import generate
from encoder_service.encoder import Encoder, ModelArtifacts
from encoder_service.publish import publish_from_live_states, shard_bounds
from encoder_service.registry import Registry
from encoder_service.settings import get_settings
from encoder_service.store import EmbeddingStore, decode_rows
from encoder_service.training.pipeline import TrainedVersion, train_version
from encoder_service.training.train import TrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedVersion:
    return train_version(
        generate(500, seed=11),
        version="v1",
        out_dir=tmp_path_factory.mktemp("models"),
        config=TrainConfig(embedding_dim=8, epochs=1, batch_size=128, seed=11),
        item_vector_dim=8,
        progress=False,
    )


@pytest.fixture
def live_states(redis_client: redis.Redis, trained: TrainedVersion) -> list[str]:
    """Every user's feature state in Redis, as the refresher keeps them; no version yet."""
    EmbeddingStore(redis_client).write_states(
        trained.user_ids, [s.to_bytes() for s in trained.states]
    )
    return trained.user_ids


def _as(artifacts: ModelArtifacts, version: str) -> ModelArtifacts:
    manifest = {**artifacts.manifest, "version": version}
    return ModelArtifacts(manifest=manifest, model=artifacts.model, catalog=artifacts.catalog)


@pytest.mark.parametrize(("n", "shards"), [(0, 1), (5, 3), (10, 1), (601, 2), (1000, 7), (3, 8)])
def test_shard_bounds_cover_every_user_once(n: int, shards: int) -> None:
    bounds = shard_bounds(n, shards)
    assert len(bounds) == shards
    assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_backfill_over_processes_matches_one_process_and_registers_once(
    redis_url: str,
    redis_client: redis.Redis,
    trained: TrainedVersion,
    live_states: list[str],
) -> None:
    artifacts = trained.artifacts()
    sharded = publish_from_live_states(
        redis_client,
        artifacts,
        processes=3,
        redis_url=redis_url,
        progress=False,
        settle_seconds=0,
    )
    assert sharded.users == len(live_states)
    publish_from_live_states(
        redis_client, _as(artifacts, "v1-single"), progress=False, settle_seconds=0
    )
    store = EmbeddingStore(redis_client)
    by_three = store.read_embeddings("v1", live_states)
    by_one = store.read_embeddings("v1-single", live_states)
    assert all(raw is not None for raw in by_three)
    assert by_three == by_one
    expected = Encoder(artifacts).encode_states(trained.states)
    stored, _ = decode_rows(by_three, 8)
    np.testing.assert_allclose(stored, expected, atol=1e-6)

    registry = Registry(redis_client)
    assert sorted(m["version"] for m in registry.list()) == ["v1", "v1-single"]
    assert registry.active() == "v1"
    history = registry.get("v1")["status_history"]  # type: ignore[index]

    again = publish_from_live_states(
        redis_client,
        artifacts,
        processes=2,
        redis_url=redis_url,
        progress=False,
        settle_seconds=0,
    )
    assert again.users == len(live_states)
    assert store.read_embeddings("v1", live_states) == by_three
    assert store.count_embeddings("v1") == len(live_states)
    assert registry.get("v1")["status_history"] == history  # type: ignore[index]
    assert len(registry.list()) == 2


def test_several_processes_need_the_url_they_connect_to(
    redis_client: redis.Redis, trained: TrainedVersion
) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        publish_from_live_states(redis_client, trained.artifacts(), processes=2, progress=False)


def test_publish_command_takes_a_process_count(
    redis_url: str,
    redis_client: redis.Redis,
    trained: TrainedVersion,
    live_states: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ENCODER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENCODER_REGISTRY_POLL_SECONDS", "0.1")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["publish", str(trained.folder), "--processes", "2"])
        refused = CliRunner().invoke(app, ["publish", str(trained.folder), "--processes", "0"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert f"published {len(live_states)} users as v1" in result.output
    assert EmbeddingStore(redis_client).count_embeddings("v1") == len(live_states)
    assert refused.exit_code == 2
    assert "processes" in refused.output
