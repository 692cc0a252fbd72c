"""Fine selection: the domain classifier's density ratio must recover a planted shift."""

from __future__ import annotations

import numpy as np
import pytest
from downstream_adapters.crossdomain.domain import (
    DomainClassifier,
    fine_select,
    importance_weights,
)


def test_density_ratio_recovers_a_planted_gaussian_mean_shift() -> None:
    rng = np.random.default_rng(0)
    shift = np.array([1.0, 0.0, -0.5])
    source = rng.normal(size=(20_000, 3))
    target = rng.normal(size=(5_000, 3)) + shift
    classifier = DomainClassifier(l2=1e-4).fit(source, target)
    probe = rng.normal(size=(2_000, 3))
    # N(shift, I) / N(0, I) = exp(x . shift - |shift|^2 / 2)
    truth = np.exp(probe @ shift - shift @ shift / 2)
    estimate = classifier.density_ratio(probe)
    log_error = np.abs(np.log(estimate) - np.log(truth))
    assert np.median(log_error) < 0.1
    assert np.corrcoef(np.log(estimate), np.log(truth))[0, 1] > 0.99


def test_no_shift_gives_weights_near_one() -> None:
    rng = np.random.default_rng(1)
    source, target = rng.normal(size=(10_000, 4)), rng.normal(size=(10_000, 4))
    ratio = DomainClassifier().fit(source, target).density_ratio(source)
    assert np.abs(importance_weights(ratio) - 1).max() < 0.15


def test_target_like_source_samples_get_the_large_weights() -> None:
    rng = np.random.default_rng(2)
    near = rng.normal(loc=2.0, size=(500, 2))  # planted: a slice of the source like the target
    far = rng.normal(loc=-2.0, size=(2_000, 2))
    target = rng.normal(loc=2.0, size=(300, 2))
    source = np.concatenate([near, far])
    weights = importance_weights(DomainClassifier().fit(source, target).density_ratio(source))
    kept = fine_select(weights, min_weight=0.25)
    assert kept[:500].mean() > 0.95 and kept[500:].mean() < 0.05
    assert weights[:500].mean() > 20 * weights[500:].mean()


def test_importance_weights_have_mean_one_and_a_cap() -> None:
    weights = importance_weights(np.array([1.0, 1.0, 1.0, 1000.0]), max_weight=2.0)
    assert weights.mean() == pytest.approx(1.0)
    # the outlier is held at twice the mean, the rest keep their (equal) relative weight
    assert weights == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    with pytest.raises(ValueError, match="max_weight"):
        importance_weights(np.ones(3), max_weight=1.0)


def test_the_classifier_needs_both_domains() -> None:
    with pytest.raises(ValueError, match="both domains"):
        DomainClassifier().fit(np.zeros((0, 2)), np.ones((3, 2)))
