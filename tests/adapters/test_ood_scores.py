"""The heads' OOD scores on synthetic embeddings: what each flags, and that it survives saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from downstream_adapters.artifact import load, save
from downstream_adapters.heads import HEADS, LinearHead, MultiTaskHead
from downstream_adapters.heads.ood import MahalanobisScorer, MinorAxesScorer

from downstream_adapters import Pin

from .test_heads import auroc, clusters


def low_rank(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32-dim points driven by 4 latent factors plus small noise, in two classes: most of the
    variance lies on 4 axes, and real points keep the correlations the other 28 encode."""
    rng = np.random.default_rng(seed)
    loadings = np.random.default_rng(99).normal(size=(4, 32)) * 2.0
    y = rng.integers(0, 2, n)
    factors = rng.normal(size=(n, 4)) + y[:, None] * 0.5
    return factors @ loadings + rng.normal(scale=0.3, size=(n, 32)), y


def broken(n: int, seed: int) -> np.ndarray:
    """Points of the same distribution whose small-noise part is three times larger: they sit
    at a usual distance along the major axes and break only the minor ones."""
    x, _ = low_rank(n, seed)
    return x + np.random.default_rng(seed + 1).normal(scale=0.85, size=x.shape)


def test_minor_axes_flag_points_that_break_the_correlations_of_real_points() -> None:
    x, y = low_rank(1000, seed=0)
    minor = MinorAxesScorer.fit(x[:800], y[:800], 2)
    full = MahalanobisScorer.fit(x[:800], y[:800], 2)
    assert minor.axes.shape == (28, 32)  # the 4 factor axes hold more than 90 % of the variance
    odd = broken(200, seed=5)
    minor_auroc = auroc(minor.score(x[800:]), minor.score(odd))
    assert minor_auroc > 0.95
    assert minor_auroc >= auroc(full.score(x[800:]), full.score(odd))


def test_a_fresh_draw_of_the_training_distribution_is_not_flagged() -> None:
    x, y = low_rank(1200, seed=1)
    minor = MinorAxesScorer.fit(x[:800], y[:800], 2)
    fresh, _ = low_rank(400, seed=2)
    assert 0.4 < auroc(minor.score(x[800:]), minor.score(fresh)) < 0.6


def test_fewer_users_than_dimensions_and_one_dimension_still_score() -> None:
    rng = np.random.default_rng(3)
    few = MinorAxesScorer.fit(rng.normal(size=(5, 16)), np.array([0, 0, 1, 1, 1]), 2)
    assert np.isfinite(few.score(rng.normal(size=(4, 16)))).all()
    line = MinorAxesScorer.fit(rng.normal(size=(50, 1)), np.zeros(50, dtype=int), 1)
    assert line.axes.shape == (1, 1)
    assert line.score(np.array([[0.0], [10.0]])).argmax() == 1


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_scores_with_each_method_and_round_trips(kind: str, tmp_path: Path) -> None:
    x, y = clusters(700)
    head = HEADS[kind]().fit(x[:500], y[:500])
    far = x[500:] * 3 + 6
    for method in ("minor", "mahalanobis"):
        assert auroc(head.ood_score(x[500:], method), head.ood_score(far, method)) > 0.95
    np.testing.assert_array_equal(head.ood_score(x[500:]), head.ood_score(x[500:], "mahalanobis"))
    loaded = load(save(tmp_path / kind, head, Pin("v1", 16, "h"))).head
    for method in ("minor", "mahalanobis", "energy"):
        np.testing.assert_allclose(
            loaded.ood_score(x[500:], method), head.ood_score(x[500:], method)
        )


def test_multitask_head_scores_each_task_and_round_trips(tmp_path: Path) -> None:
    x, y = clusters(700)
    parity = (x[:, 0] > 0).astype(int)
    head = MultiTaskHead(epochs=5).fit(x[:500], {"cluster": y[:500], "sign": parity[:500]})
    far = x[500:] * 3 + 6
    for task in ("cluster", "sign"):
        for method in ("minor", "mahalanobis"):
            inside, outside = (
                head.ood_score(x[500:], task, method),
                head.ood_score(far, task, method),
            )
            assert auroc(inside, outside) > 0.95
    loaded = load(save(tmp_path / "mt", head, Pin("v1", 16, "h"))).head
    for task in ("cluster", "sign"):
        for method in ("minor", "mahalanobis"):
            np.testing.assert_allclose(
                loaded.ood_score(x[500:], task, method), head.ood_score(x[500:], task, method)
            )


def test_an_unknown_method_is_refused_by_name() -> None:
    x, y = clusters(200)
    head = LinearHead(epochs=2).fit(x, y)
    with pytest.raises(ValueError, match="unknown OOD method 'knn': use one of mahalanobis, minor"):
        head.ood_score(x[:3], "knn")  # type: ignore[arg-type]
    multitask = MultiTaskHead(epochs=2).fit(x, {"cluster": y})
    with pytest.raises(ValueError, match="unknown OOD method"):
        multitask.ood_score(x[:3], "cluster", "Mahalanobis")  # type: ignore[arg-type]


def test_a_head_saved_before_the_minor_axes_still_scores_mahalanobis() -> None:
    x, y = clusters(300)
    head = LinearHead(epochs=5).fit(x, y)
    config, arrays = head.state()
    older = {k: v for k, v in arrays.items() if not k.startswith("ood.minor_")}
    loaded = LinearHead.from_state(config, older)
    np.testing.assert_allclose(
        loaded.ood_score(x[:5], "mahalanobis"), head.ood_score(x[:5], "mahalanobis")
    )
    np.testing.assert_allclose(loaded.ood_score(x[:5]), head.ood_score(x[:5]))
    with pytest.raises(RuntimeError, match=r"method='mahalanobis'\) or refit the head"):
        loaded.ood_score(x[:5], "minor")
