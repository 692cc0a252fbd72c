"""Carrying item-taste sums over to a new catalogue: exact for a linear change of vectors."""

from __future__ import annotations

import numpy as np
import pytest

from encoder_service.data.contract import Event
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.state import FeatureState
from encoder_service.features.translation import fill_missing_sums, fit_translation


def _catalog(ids: list[str], vectors: np.ndarray) -> ItemCatalog:
    return ItemCatalog(tuple(ids), tuple(("c",) for _ in ids), vectors.astype(np.float32))


def _rotation(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


@pytest.fixture
def catalogs() -> tuple[ItemCatalog, ItemCatalog]:
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(50)]
    old = rng.normal(size=(50, 6))
    # The new catalogue rotates and rescales the old vectors and knows five more items.
    new = np.vstack([2.0 * old @ _rotation(6, 1), rng.normal(size=(5, 6))])
    return _catalog(ids, old), _catalog(ids + [f"n{k}" for k in range(5)], new)


def _history(user: str, items: list[str]) -> list[Event]:
    return [
        Event(user_id=user, item_id=item, timestamp=1_700_000_000 + 3600 * k, weight=1.0 + k % 3)
        for k, item in enumerate(items)
    ]


def test_a_linear_change_of_vectors_is_recovered_exactly(catalogs) -> None:
    old, new = catalogs
    translation = fit_translation(old, new)
    assert translation is not None and translation.shared_items == 50
    assert translation.r2 == pytest.approx(1.0, abs=1e-6)

    events = _history("u1", ["i3", "i7", "i3", "i40"])
    migrated, rebuilt = FeatureState(), FeatureState()
    for event in events:
        migrated.apply(event, {old.hash: old})
        rebuilt.apply(event, {old.hash: old, new.hash: new})
    assert fill_missing_sums(migrated, {new.hash: [translation]})
    np.testing.assert_allclose(
        migrated.item_sums[new.hash], rebuilt.item_sums[new.hash], rtol=1e-3, atol=1e-4
    )
    # Sums that exist are never overwritten, and later events add onto the carried sums.
    assert not fill_missing_sums(migrated, {new.hash: [translation]})
    later = _history("u1", ["n2"])[0]
    migrated.apply(later, {old.hash: old, new.hash: new})
    rebuilt.apply(later, {old.hash: old, new.hash: new})
    np.testing.assert_allclose(
        migrated.item_sums[new.hash], rebuilt.item_sums[new.hash], rtol=1e-3, atol=1e-4
    )


def test_too_few_shared_items_give_no_map(catalogs) -> None:
    old, _ = catalogs
    other = _catalog([f"x{k}" for k in range(40)] + ["i1"], np.ones((41, 6)))
    assert fit_translation(old, other) is None


def test_empty_states_and_states_without_a_source_stay_as_they_are(catalogs) -> None:
    old, new = catalogs
    translation = fit_translation(old, new)
    assert translation is not None
    empty = FeatureState()
    assert not fill_missing_sums(empty, {new.hash: [translation]})
    elsewhere = FeatureState()
    third = _catalog(["i1", "i2"], np.ones((2, 6)))
    elsewhere.apply(_history("u2", ["i1"])[0], {third.hash: third})
    assert not fill_missing_sums(elsewhere, {new.hash: [translation]})
    assert new.hash not in elsewhere.item_sums


def test_a_batch_is_filled_as_each_state_is(catalogs) -> None:
    from encoder_service.features.batch import StateBatch
    from encoder_service.features.translation import fill_missing_batch

    old, new = catalogs
    translation = fit_translation(old, new)
    assert translation is not None
    states = [FeatureState(), FeatureState(), FeatureState()]
    for event in _history("u1", ["i3", "i9"]):
        states[0].apply(event, {old.hash: old})
    for event in _history("u2", ["i5"]):
        states[2].apply(event, {old.hash: old, new.hash: new})  # already has v2 sums
    batch = StateBatch.from_states(states)
    assert fill_missing_batch(batch, {new.hash: [translation]}) == 1
    for state in states:
        fill_missing_sums(state, {new.hash: [translation]})
    assert batch.to_bytes() == StateBatch.from_states(states).to_bytes()
