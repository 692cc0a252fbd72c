"""The export script's out-of-distribution users, encoded by a real (small) trained version.

The script is a repository script, not a module of either package, so it is loaded from its
path; the encoder is trained here on a small synthetic data set.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from encoder_service.data.synthetic import generate_with_truth
from encoder_service.encoder import Encoder
from encoder_service.training.pipeline import train_version
from encoder_service.training.train import TrainConfig

SCRIPT = Path(__file__).parents[2] / "downstream_adapters" / "scripts" / "export_embeddings.py"


@pytest.fixture(scope="module")
def export():
    spec = importlib.util.spec_from_file_location("export_embeddings", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ood_users_are_built_and_encoded_by_the_version(export, tmp_path: Path) -> None:
    dataset, _ = generate_with_truth(80, seed=5, mean_events=20)
    trained = train_version(
        dataset,
        version="syn",
        out_dir=tmp_path,
        config=TrainConfig(epochs=2, seed=0, num_threads=1),
        item_vector_dim=8,
        exclude_profile=["gender", "age"],
        progress=False,
    )
    encoder = Encoder(trained.artifacts())
    rng = np.random.default_rng(0)
    bots = export.bot_users(dataset, rng)
    shuffled = export.shuffled_users(dataset, rng)

    per_bot = bots.events.groupby("user_id")
    assert per_bot.ngroups == export.BOTS
    assert per_bot.size().between(*export.BOT_EVENTS).all()
    assert (per_bot["weight"].nunique() == 1).all()
    span = per_bot["timestamp"].max() - per_bot["timestamp"].min()
    assert (span <= 60 * export.BOT_MINUTES[1]).all()
    # A shuffled history keeps every event's time and rating, only the items change.
    assert len(shuffled.events) == len(dataset.events)
    assert np.array_equal(
        np.sort(shuffled.events["timestamp"].to_numpy()),
        np.sort(dataset.events["timestamp"].to_numpy()),
    )
    assert (shuffled.events["item_id"].to_numpy() != dataset.events["item_id"].to_numpy()).any()

    for case in (bots, shuffled):
        vectors = export.encode(encoder, case)
        assert vectors.shape == (len(case.users), encoder.dim)
        assert np.isfinite(vectors).all()
