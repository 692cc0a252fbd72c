"""The harness end to end on a small synthetic set, embeddings read from a real API.

The encoder is trained here (set-up only) with the label fields excluded from its input; the
harness then reads the published embeddings over HTTP like any downstream team.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from downstream_adapters.evaluate.cli import main

from encoder_service.api.app import create_app
from encoder_service.data.synthetic import generate_with_truth
from encoder_service.encoder import Encoder
from encoder_service.registry import Registry
from encoder_service.store import EmbeddingStore
from encoder_service.training.pipeline import train_version
from encoder_service.training.train import TrainConfig
from tests.api.conftest import KEYS, live_server, make_settings

N_USERS = 300


@pytest.fixture
def synthetic_run(tmp_path: Path, redis_client: redis.Redis, redis_url: str):
    dataset, archetype = generate_with_truth(N_USERS, seed=3, mean_events=30)
    trained = train_version(
        dataset,
        version="syn",
        out_dir=tmp_path,
        config=TrainConfig(epochs=5, seed=0, num_threads=1),
        item_vector_dim=8,
        exclude_profile=["gender", "age"],
        progress=False,
    )
    vectors = Encoder(trained.artifacts()).encode_features(trained.features)
    EmbeddingStore(redis_client).write_embeddings("syn", trained.user_ids, vectors)
    registry = Registry(redis_client)
    registry.register(trained.manifest, b"", b"", by="tests")
    registry.promote("syn", by="tests")

    events = dataset.events[["user_id", "item_id", "timestamp", "weight"]]
    events.to_csv(tmp_path / "events.csv", index=False)
    items = dataset.items.assign(categories=dataset.items["categories"].map("|".join))
    items[["item_id", "categories"]].to_csv(tmp_path / "items.csv", index=False)
    labels = pd.DataFrame(
        {
            "user_id": dataset.users["user_id"],
            "gender": dataset.users["gender"],
            "archetype": np.asarray(archetype).astype(str),
        }
    )
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with live_server(create_app(make_settings(redis_url))) as url:
        yield url, tmp_path


def test_harness_on_synthetic_data(synthetic_run, capsys: pytest.CaptureFixture[str]) -> None:
    url, folder = synthetic_run
    args = [
        "--service", url, "--version", "syn", "--api-key", KEYS["read"], "--batch-size", "50",
        "--events", str(folder / "events.csv"), "--items", str(folder / "items.csv"),
        "--labels", str(folder / "labels.csv"), "--folds", "3", "--shots", "5",
        "--repeats", "1", "--json", str(folder / "out.json"), "--plots", str(folder / "plots"),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "embedding (LR)" in printed and "raw items (LR)" in printed
    report = json.loads((folder / "out.json").read_text())
    assert report["pin"]["version"] == "syn" and report["pin"]["dim"] == 64
    rows = report["results"]
    assert set(rows) >= {"embedding (LR)", "svd-64 (LR)", "aggregates (LR)", "random-64 (LR)"}
    assert "embedding + MultiTaskHead" in rows
    # The archetype drives behaviour, so the embedding must beat the random control on it.
    archetype = {r: rows[r]["archetype"]["accuracy"] for r in rows}
    assert archetype["embedding (LR)"] > archetype["random-64 (LR)"] + 0.1
    assert all(c["baseline"] and "delta" in c for c in report["comparisons"])
    assert set(report["scenarios"]["few_shot"]["archetype"]) >= {"matching", "relation"}
    assert {p.name for p in (folder / "plots").iterdir()} == {
        "main.png",
        "few_shot.png",
        "imbalance.png",
        "cost.png",
    }
    # Read from a service there are no OOD users, and the service state size is unknown.
    assert "ood" not in report["scenarios"]
    assert report["cost"]["rows"]["embedding + LinearHead per task"]["n_models"] == 2
    assert report["cost"]["rows"]["embedding + LinearHead per task"]["stored_bytes_per_user"] == 256
