"""The autoencoder and its training loop on small structured inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_service.features.schema import SegmentKind
from encoder_service.training.model import (
    MultiGroupAutoencoder,
    group_dropout_mask,
    segment_loss,
    standardisation_stats,
)
from encoder_service.training.train import TrainConfig, evaluate, train_autoencoder

from . import synthetic_features, tiny_schema

SCHEMA = tiny_schema()


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return synthetic_features(SCHEMA, 1200, seed=3)


@pytest.fixture(scope="module")
def trained(features: np.ndarray):
    config = TrainConfig(embedding_dim=16, epochs=4, batch_size=64, seed=7, num_threads=1)
    return train_autoencoder(features, SCHEMA, config, progress=False)


def _model(x: np.ndarray, **kwargs) -> MultiGroupAutoencoder:
    mean, std = standardisation_stats(x)
    torch.manual_seed(0)
    return MultiGroupAutoencoder.from_schema(SCHEMA, 16, mean=mean, std=std, **kwargs)


def test_synthetic_inputs_respect_segment_kinds(features: np.ndarray) -> None:
    for group in SCHEMA.groups:
        for seg in group.segments:
            values = features[:, seg.start : seg.end]
            if seg.kind is SegmentKind.DISTRIBUTION:
                assert (values >= 0).all()
                sums = values.sum(axis=1)
                assert np.allclose(sums[sums > 0], 1.0, atol=1e-5)
                assert (sums == 0).any()
            elif seg.kind is SegmentKind.CATEGORICAL:
                assert ((values == 0) | (values == 1)).all()
                assert (values.sum(axis=1) == 1).all()


def test_training_reduces_the_loss(features: np.ndarray, trained) -> None:
    untrained = _model(features[trained.val_index])
    initial, _ = evaluate(untrained, torch.from_numpy(features[trained.val_index]))
    history = trained.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert trained.metrics["val_loss"] < 0.8 * initial
    assert set(history[0]["val_loss_per_group"]) == {g.name for g in SCHEMA.groups}
    assert trained.metrics["n_train"] + trained.metrics["n_val"] == len(features)
    assert trained.metrics["users_per_second"] > 0
    assert not trained.model.training


def test_same_seed_gives_identical_weights(features: np.ndarray, trained) -> None:
    config = TrainConfig(embedding_dim=16, epochs=4, batch_size=64, seed=7, num_threads=1)
    again = train_autoencoder(features, SCHEMA, config, progress=False)
    first, second = trained.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    x = torch.from_numpy(features[:50])
    with torch.no_grad():
        assert torch.equal(trained.model.encode(x), again.model.encode(x))
    assert np.array_equal(trained.val_index, again.val_index)


def test_early_stopping_restores_the_best_epoch(features: np.ndarray) -> None:
    # 40 training rows and a large learning rate: validation loss soon rises (overfitting).
    x = features[:44]
    config = TrainConfig(
        embedding_dim=16, epochs=60, batch_size=8, lr=1e-2, weight_decay=0.0,
        group_dropout=0.0, val_fraction=0.1, patience=3, seed=1, num_threads=1,
    )  # fmt: skip
    result = train_autoencoder(x, SCHEMA, config, progress=False)
    val_losses = [h["val_loss"] for h in result.history]
    assert len(result.history) < config.epochs
    assert result.best_epoch < len(result.history)
    assert len(result.history) - result.best_epoch == config.patience
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    restored, _ = evaluate(result.model, torch.from_numpy(x[result.val_index]))
    assert restored == pytest.approx(result.metrics["val_loss"], rel=1e-5)
    assert restored < val_losses[-1]


def test_group_dropout_never_drops_every_group() -> None:
    generator = torch.Generator().manual_seed(0)
    dropped = group_dropout_mask(20_000, 3, 0.9, generator)
    assert not dropped.all(dim=1).any()
    assert dropped.float().mean().item() > 0.6
    rate = group_dropout_mask(50_000, 6, 0.25, generator).float().mean().item()
    assert rate == pytest.approx(0.25, abs=0.01)


def test_dropped_groups_are_encoded_as_their_training_mean(features: np.ndarray) -> None:
    model = _model(features, group_dropout=0.5)
    x = torch.from_numpy(features[:300])
    model.train()
    generator = torch.Generator().manual_seed(5)
    dropped = group_dropout_mask(len(x), len(SCHEMA.groups), 0.5, generator.clone_state())
    with torch.no_grad():
        embedding, outputs = model(x, generator=generator)
        masked = x.clone()
        for index, group in enumerate(SCHEMA.groups):
            rows = dropped[:, index]
            masked[rows, group.start : group.end] = model.encoder.standardize.mean[
                group.start : group.end
            ]
        expected = model.encode(masked)
    assert dropped.any() and not dropped.all()
    assert torch.allclose(embedding, expected, atol=1e-5)
    assert [o.shape[1] for o in outputs] == [g.end - g.start for g in SCHEMA.groups]


def test_encode_never_drops_groups(features: np.ndarray) -> None:
    model = _model(features, group_dropout=0.5)
    model.train()
    x = torch.from_numpy(features[:64])
    with torch.no_grad():
        assert torch.equal(model.encode(x), model.encode(x))
        model.eval()
        assert torch.equal(model.encode(x), model(x)[0])


def test_distribution_loss_ignores_rows_without_mass() -> None:
    seg = next(s for g in SCHEMA.groups for s in g.segments if s.kind is SegmentKind.DISTRIBUTION)
    logits = torch.randn(4, seg.width)
    target = torch.softmax(torch.randn(4, seg.width), dim=1)
    target[2:] = 0.0
    both = segment_loss(seg, logits, target, target)
    with_mass = segment_loss(seg, logits[:2], target[:2], target[:2])
    assert both.item() == pytest.approx(with_mass.item())
    assert segment_loss(seg, logits[2:], target[2:], target[2:]).item() == 0.0


def test_categorical_and_dense_losses() -> None:
    profile = SCHEMA.group("profile")
    categorical = next(s for s in profile.segments if s.kind is SegmentKind.CATEGORICAL)
    dense = next(s for s in profile.segments if s.kind is SegmentKind.DENSE)
    one_hot = torch.eye(categorical.width)[[0, 2, 1]]
    assert segment_loss(categorical, one_hot * 50, one_hot, one_hot).item() < 1e-6
    assert segment_loss(categorical, -one_hot * 50, one_hot, one_hot).item() > 10
    standardised = torch.randn(3, dense.width)
    raw = standardised * 100
    assert segment_loss(dense, standardised, raw, standardised).item() == 0.0


def test_standardisation_floors_constant_features() -> None:
    x = np.zeros((10, 3), dtype=np.float32)
    x[:, 1] = np.arange(10)
    mean, std = standardisation_stats(x)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    assert std[0] == pytest.approx(1e-3) and std[1] == pytest.approx(np.arange(10).std())


def test_training_refuses_bad_inputs(features: np.ndarray) -> None:
    config = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match="shape"):
        train_autoencoder(features[:, :-1], SCHEMA, config, progress=False)
    broken = features.copy()
    broken[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_autoencoder(broken, SCHEMA, config, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        train_autoencoder(features[:5], SCHEMA, config, progress=False)


def test_null_group_losses_are_the_constant_predictor_losses() -> None:
    from encoder_service.features.schema import Group, Segment
    from encoder_service.training.model import null_group_losses

    groups = [
        Group("dense", (Segment("d", SegmentKind.DENSE, 0, 2),)),
        Group("cat", (Segment("c", SegmentKind.CATEGORICAL, 2, 4),)),
        Group("dist", (Segment("p", SegmentKind.DISTRIBUTION, 4, 6),)),
    ]
    x = np.array(
        [[0.0, 5.0, 1, 0, 1, 0], [1.0, 5.0, 0, 1, 0, 1], [2.0, 5.0, 1, 0, 0, 0]], np.float32
    )
    scales = null_group_losses(x, groups)
    # One of two dense features varies; classes 2:1; rows with mass are one-hot on each side.
    assert scales[0] == pytest.approx(0.5)
    assert scales[1] == pytest.approx(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))
    assert scales[2] == pytest.approx(np.log(2))


def test_null_item_loss_matches_a_popularity_predictor() -> None:
    import scipy.sparse as sp

    from encoder_service.training.model import null_item_loss

    items = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32))
    assert null_item_loss(items) == pytest.approx(np.log(2))


def test_item_set_reconstruction_trains_and_is_reported(features: np.ndarray) -> None:
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    # Items follow a dense activity feature, so the embedding can learn to predict them.
    column = features[:, SCHEMA.group("activity").start]
    liked = (column > np.median(column)).astype(np.float32)[:, None]
    dense = np.hstack([liked, 1 - liked, rng.random((len(features), 3)) < 0.1]).astype(np.float32)
    config = TrainConfig(
        embedding_dim=16, epochs=6, batch_size=64, seed=7, num_threads=1, item_weight=5.0
    )
    result = train_autoencoder(features, SCHEMA, config, items=sp.csr_matrix(dense), progress=False)
    history = result.history
    assert "items" in history[0]["val_loss_per_group"]
    assert history[-1]["val_loss_per_group"]["items"] < history[0]["val_loss_per_group"]["items"]
    assert result.model.item_decoder is not None and result.model.item_decoder.out_features == 5


def test_item_targets_are_checked_and_capped(features: np.ndarray) -> None:
    import scipy.sparse as sp

    config = TrainConfig(embedding_dim=8, epochs=1, seed=1, num_threads=1, max_items=2)
    items = sp.csr_matrix(np.tile(np.array([3, 0, 1, 2], np.float32), (len(features), 1)))
    result = train_autoencoder(features, SCHEMA, config, items=items, progress=False)
    assert result.model.item_decoder is not None and result.model.item_decoder.out_features == 2
    with pytest.raises(ValueError, match="rows"):
        train_autoencoder(features, SCHEMA, config, items=items[:10], progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        train_autoencoder(features, SCHEMA, config, items=-items, progress=False)


def test_max_branch_width_caps_every_branch_of_wider_groups(features: np.ndarray) -> None:
    widths = [g.end - g.start for g in SCHEMA.groups]
    cap = max(16, max(widths) - 1)
    assert any(w > cap for w in widths), "the schema needs a group wider than the cap"
    model = _model(features, max_branch_width=cap)
    hidden = [branch.net[0].out_features for branch in model.encoder.branches]
    assert hidden == [min(cap, max(16, w)) for w in widths]
    assert model.encoder.fusion.in_features == sum(hidden)
    assert [d.net[0].out_features for d in model.decoders] == hidden
    # The default leaves every group of this schema at its own width (within [16, 128]).
    assert [b.net[0].out_features for b in _model(features).encoder.branches] == [
        min(128, max(16, w)) for w in widths
    ]
