"""Item vectors from co-occurrence: co-consumed items end up close, the rest do not."""

from __future__ import annotations

import numpy as np
import pytest

from encoder_service.training.item_vectors import learn_item_vectors

N_ITEMS = 41
"""Two blocks of 20 items, each consumed by its own group of users, and one item nobody saw."""


def _two_communities(seed: int = 0, n_users: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Users of the first half consume items 0-19, the others items 20-39; item 40 is unseen."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(n_users):
        block = 0 if user < n_users // 2 else 20
        history = rng.choice(20, size=rng.integers(3, 12), replace=False) + block
        users.extend([user] * len(history))
        items.extend(history)
    return np.array(users), np.array(items)


def _block_similarity(vectors: np.ndarray) -> tuple[float, float]:
    cosine = vectors[:40] @ vectors[:40].T
    same = np.zeros((40, 40), dtype=bool)
    same[:20, :20] = same[20:, 20:] = True
    np.fill_diagonal(same, False)
    different = ~same
    np.fill_diagonal(different, False)
    return float(cosine[same].mean()), float(cosine[different].mean())


def test_co_consumed_items_are_closer_than_items_of_disjoint_users() -> None:
    users, items = _two_communities()
    vectors = learn_item_vectors(users, items, N_ITEMS, dim=8, seed=0)
    assert vectors.shape == (N_ITEMS, 8) and vectors.dtype == np.float32
    within, across = _block_similarity(vectors)
    assert within > 0.5
    assert within > across + 0.5
    assert np.allclose(np.linalg.norm(vectors[:40], axis=1), 1.0, atol=1e-5)
    assert not vectors[40].any()


def test_same_seed_same_vectors() -> None:
    users, items = _two_communities()
    first = learn_item_vectors(users, items, N_ITEMS, dim=8, seed=3, max_history=5)
    second = learn_item_vectors(users, items, N_ITEMS, dim=8, seed=3, max_history=5)
    assert np.array_equal(first, second)


def test_bounded_counting_keeps_the_structure() -> None:
    users, items = _two_communities(n_users=2000)
    vectors = learn_item_vectors(
        users, items, N_ITEMS, dim=8, seed=0, max_history=4, max_pairs=5_000
    )
    within, across = _block_similarity(vectors)
    assert within > across + 0.5


def test_weights_and_repeats() -> None:
    users, items = _two_communities()
    repeated = learn_item_vectors(
        np.concatenate([users, users]), np.concatenate([items, items]), N_ITEMS, dim=8
    )
    assert np.allclose(repeated, learn_item_vectors(users, items, N_ITEMS, dim=8), atol=1e-5)
    weights = np.random.default_rng(1).uniform(0.5, 5.0, len(users))
    weighted = learn_item_vectors(users, items, N_ITEMS, dim=8, weights=weights)
    within, across = _block_similarity(weighted)
    assert within > across + 0.5


def test_dim_larger_than_the_catalogue_pads_with_zeros() -> None:
    users = np.array([0, 0, 0, 1, 1, 2, 2])
    items = np.array([0, 1, 2, 0, 1, 1, 2])
    vectors = learn_item_vectors(users, items, 4, dim=8)
    assert vectors.shape == (4, 8)
    assert not vectors[:, 3:].any() and not vectors[3].any()
    assert np.allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-5)


def test_no_co_occurrence_gives_zero_rows() -> None:
    vectors = learn_item_vectors(np.array([0, 1, 2]), np.array([0, 1, 2]), 5, dim=4)
    assert not vectors.any()


@pytest.mark.parametrize(
    ("users", "items", "weights", "message"),
    [
        ([0, 1], [0, 5], None, "n_items"),
        ([0, -1], [0, 1], None, ">= 0"),
        ([0, 1], [0, 1, 2], None, "same length"),
        ([0.0, 1.0], [0, 1], None, "integer"),
        ([0, 1], [0, 1], [1.0, -1.0], "weights"),
        ([0, 1], [0, 1], [1.0], "weights"),
    ],
)
def test_refuses_bad_events(users, items, weights, message) -> None:
    with pytest.raises(ValueError, match=message):
        learn_item_vectors(
            np.array(users),
            np.array(items),
            5,
            weights=None if weights is None else np.array(weights),
        )
