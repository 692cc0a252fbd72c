"""Seed ensembles: aligning members, and distilling their mean into one encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_service.alignment import procrustes
from encoder_service.training.ensemble import aligned_mean
from encoder_service.training.train import TrainConfig, train_autoencoder

from . import synthetic_features, tiny_schema

SCHEMA = tiny_schema()


def _r2_after_procrustes(source: np.ndarray, target: np.ndarray) -> float:
    weight, bias = procrustes(source, target)
    residual = ((source @ weight + bias - target) ** 2).sum()
    return float(1 - residual / ((target - target.mean(0)) ** 2).sum())


def _row_normalised(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(1, keepdims=True))


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q


def test_the_aligned_mean_of_rotated_noisy_copies_is_closer_to_the_truth_than_any_copy() -> None:
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((500, 8))
    members = [
        ((truth + 0.8 * rng.standard_normal(truth.shape)) @ _random_rotation(rng, 8)) * scale
        + shift
        for scale, shift in [(1.0, 0.0), (2.5, 1.0), (0.5, -3.0), (1.7, 0.2), (0.9, 2.0)]
    ]
    mean = aligned_mean([m.astype(np.float32) for m in members])
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose((mean**2).mean(axis=1), 1.0, atol=1e-3)
    target = _row_normalised(truth)
    single = max(_r2_after_procrustes(_row_normalised(m), target) for m in members)
    assert _r2_after_procrustes(mean, target) > single + 0.1


def test_aligned_mean_needs_members() -> None:
    with pytest.raises(ValueError, match="no member"):
        aligned_mean([])


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return synthetic_features(SCHEMA, 1200, seed=3)


def _config(**overrides) -> TrainConfig:
    return TrainConfig(
        **{"embedding_dim": 8, "epochs": 6, "batch_size": 64, "num_threads": 1, **overrides}
    )


def _embed(result, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return result.model.encode(torch.from_numpy(x)).numpy()


def test_an_ensemble_is_distilled_into_one_encoder_and_reported(features: np.ndarray) -> None:
    single = train_autoencoder(features, SCHEMA, _config(seed=5), progress=False)
    result = train_autoencoder(features, SCHEMA, _config(seed=5, ensemble_size=3), progress=False)
    report = result.metrics["ensemble"]
    assert report["size"] == 3 and len(report["member_val_losses"]) == 3
    # The first member is the single model trained with the same seed.
    assert report["member_val_losses"][0] == pytest.approx(single.metrics["val_loss"])
    assert report["distilled_r2"] > 0.9
    assert "ensemble" not in single.metrics
    # The served encoder is the distilled one, not the first member's.
    assert not np.allclose(_embed(result, features), _embed(single, features))
    again = train_autoencoder(features, SCHEMA, _config(seed=5, ensemble_size=3), progress=False)
    np.testing.assert_array_equal(_embed(again, features), _embed(result, features))


def test_ensembles_from_different_seeds_agree_more_than_single_models(
    features: np.ndarray,
) -> None:
    """What the ensemble is for: a retrained version lands closer to the one before."""

    def agreement(size: int) -> float:
        a, b = (
            _embed(
                train_autoencoder(
                    features, SCHEMA, _config(seed=s, ensemble_size=size), progress=False
                ),
                features,
            )
            for s in (11, 12)
        )
        return _r2_after_procrustes(a, b)

    single, ensembled = agreement(1), agreement(4)
    assert ensembled > single + 0.02, (single, ensembled)


def test_ensemble_size_must_be_positive(features: np.ndarray) -> None:
    with pytest.raises(ValueError, match="ensemble_size"):
        train_autoencoder(features, SCHEMA, _config(ensemble_size=0), progress=False)
