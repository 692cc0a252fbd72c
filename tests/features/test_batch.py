"""StateBatch: many users at once must give exactly, bit for bit, what FeatureState gives."""

from __future__ import annotations

import copy

import numpy as np
import orjson
import pytest

from encoder_service.data.contract import Event
from encoder_service.features.batch import StateBatch
from encoder_service.features.build import build_catalog, fit_schema
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.state import LEGACY_STATE_MAGIC, STATE_HEADER, FeatureState
from encoder_service.features.vectorize import Vectorizer
from tests.features.test_state import DAY, _dataset, _replay


@pytest.fixture(scope="module")
def world():
    """Replayed states of 60 users, two catalogues (the second knows only some items and has
    no popularity coordinates), and one user holding the sums of a catalogue no longer live."""
    dataset = _dataset(seed=5, n_users=60)
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(len(dataset.items), 6)).astype(np.float32)
    first = build_catalog(dataset, vectors, popularity_bins=4)
    half = len(dataset.items) // 2
    second = ItemCatalog(
        item_ids=tuple(f"i{k}" for k in range(half)),
        categories=tuple(("drama",) if k % 2 else ("fresh-genre", "news") for k in range(half)),
        vectors=rng.normal(size=(half, 4)).astype(np.float32),
    )
    schema = fit_schema(dataset, item_vector_dim=first.taste_dim, popularity_bins=4)
    states = _replay(dataset, {first.hash: first}, seed=3)
    retired = ItemCatalog(("x",), (("drama",),), np.ones((1, 3), dtype=np.float32))
    states[7].apply(Event("u7", "x", states[7].t_last - DAY), {retired.hash: retired})
    catalogs = {first.hash: first, second.hash: second}
    return schema, catalogs, states


def _events(states: list[FeatureState | None], seed: int) -> list[tuple[int, Event]]:
    """Several events per user in a random interleaving: in order, late, unknown items with
    categories, new labels, profiles, no context."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, Event]] = []
    for _ in range(4 * len(states)):
        u = int(rng.integers(len(states)))
        state = states[u]
        base = state.t_last if state is not None and state.count else 1_700_000_000.0
        t = float(base + rng.uniform(-30 * DAY, 5 * DAY))
        known = rng.random() < 0.7
        pairs.append(
            (
                u,
                Event(
                    user_id=f"user-{u}",
                    item_id=f"i{rng.integers(40)}" if known else f"new-{rng.integers(5)}",
                    timestamp=t,
                    event_type=str(rng.choice(["view", "click", "brand-new-type"])),
                    weight=float(rng.choice([0.0, 0.5, 1.0, 4.0])),
                    context=None if rng.random() < 0.3 else str(rng.choice(["tv", "car"])),
                    categories=() if known else ("sport", "unseen-genre")[: rng.integers(3)],
                    profile={"age": float(rng.integers(18, 70))} if rng.random() < 0.2 else {},
                ),
            )
        )
    return pairs


def _assert_identical(actual: FeatureState, expected: FeatureState) -> None:
    assert actual.count == expected.count
    assert (actual.t_first, actual.t_last) == (expected.t_first, expected.t_last)
    assert (actual.weight_sum, actual.weight_sq_sum) == (
        expected.weight_sum,
        expected.weight_sq_sum,
    )
    assert actual.profile == expected.profile
    np.testing.assert_array_equal(actual.mass, expected.mass)
    np.testing.assert_array_equal(actual.heatmap, expected.heatmap)
    assert list(actual.categories) == list(expected.categories)  # same order too
    for name, values in expected.categories.items():
        np.testing.assert_array_equal(actual.categories[name], values)
    assert actual.event_types == expected.event_types
    assert list(actual.event_types) == list(expected.event_types)
    assert actual.contexts == expected.contexts
    assert actual.item_sums.keys() == expected.item_sums.keys()
    for key, values in expected.item_sums.items():
        np.testing.assert_array_equal(actual.item_sums[key], values)


def test_applying_a_batch_equals_applying_each_event_in_turn_bit_for_bit(world) -> None:
    schema, catalogs, states = world
    start: list[FeatureState | None] = [*states[:40], None, None, None, FeatureState()]
    pairs = _events(start, seed=11)
    assert max(np.bincount([u for u, _ in pairs])) >= 4  # several rounds

    expected = [copy.deepcopy(s) if s is not None else FeatureState() for s in start]
    for u, e in pairs:
        expected[u].apply(e, catalogs)
    batch = StateBatch.from_bytes([s.to_bytes() if s is not None else None for s in start])
    reference = [
        FeatureState.from_bytes(s.to_bytes()) if s is not None else FeatureState() for s in start
    ]
    for u, e in pairs:
        reference[u].apply(e, catalogs)
    batch.apply(pairs, catalogs)

    for u, state in enumerate(reference):
        _assert_identical(batch.state(u), state)
    assert batch.to_bytes() == [s.to_bytes() for s in reference]
    for catalog_id in (next(iter(catalogs)), None):  # the schema's catalogue, and none
        vectorize = Vectorizer(schema, catalog_id)
        np.testing.assert_array_equal(vectorize(batch), vectorize(reference))
    # Stored states are float32, so the batch read from bytes is close to the float64 replay.
    for u, state in enumerate(expected):
        np.testing.assert_allclose(batch.state(u).mass, state.mass, rtol=1e-6)


def test_a_batch_from_states_keeps_full_precision_and_applies_like_them(world) -> None:
    _, catalogs, states = world
    pairs = _events(list(states), seed=12)
    batch = StateBatch.from_states(states)
    for u, state in enumerate(states):
        _assert_identical(batch.state(u), state)
    replayed = copy.deepcopy(states)
    for u, e in pairs:
        replayed[u].apply(e, catalogs)
    batch.apply(pairs, catalogs)
    for u, state in enumerate(replayed):
        _assert_identical(batch.state(u), state)


def test_batch_bytes_are_the_feature_state_bytes(world) -> None:
    _, _, states = world
    blobs = [s.to_bytes() for s in states]
    batch = StateBatch.from_bytes([*blobs, None])
    assert batch.to_bytes()[:-1] == blobs
    assert batch.to_bytes()[-1] == FeatureState().to_bytes()
    assert len(batch.item_sums) == 2  # the live catalogue and the one only user 7 holds
    for u, blob in enumerate(blobs):
        _assert_identical(batch.state(u), FeatureState.from_bytes(blob))


def test_corrupt_state_bytes_are_refused(world) -> None:
    _, _, states = world
    blob = states[0].to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        StateBatch.from_bytes([states[1].to_bytes(), blob[:-4]])
    with pytest.raises(ValueError, match="magic"):
        StateBatch.from_bytes([b"XX" + blob[2:]])


def _legacy_bytes(state: FeatureState) -> bytes:
    """A state as ``FS1`` wrote it before ``FS2``: names and float64 numbers as JSON text."""
    item_ids = sorted(state.item_sums)
    header = {
        "t0": state.t_first if state.count else None,
        "t1": state.t_last if state.count else None,
        "n": state.count,
        "ws": state.weight_sum,
        "wq": state.weight_sq_sum,
        "cat": {k: v.tolist() for k, v in state.categories.items()},
        "et": state.event_types,
        "cx": state.contexts,
        "p": state.profile,
        "it": [[cid, int(state.item_sums[cid].shape[1])] for cid in item_ids],
    }
    head = orjson.dumps(header, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    arrays = [state.mass, state.heatmap, *(state.item_sums[cid].ravel() for cid in item_ids)]
    body = np.concatenate(arrays).astype("<f4").tobytes()
    return STATE_HEADER.pack(LEGACY_STATE_MAGIC, len(head)) + head + body


def test_states_stored_before_fs2_read_the_same_and_are_rewritten_as_fs2(world) -> None:
    _, _, states = world
    current = [s.to_bytes() for s in states]
    legacy = [_legacy_bytes(s) for s in states]
    assert all(b[:3] == b"FS2" for b in current) and all(b[:3] == b"FS1" for b in legacy)
    for old, new in zip(legacy, current, strict=True):
        _assert_identical(FeatureState.from_bytes(old), FeatureState.from_bytes(new))
    mixed = StateBatch.from_bytes([legacy[0], *current[1:], None])
    assert mixed.to_bytes()[:-1] == [FeatureState.from_bytes(b).to_bytes() for b in current]
    assert StateBatch.from_bytes(legacy).to_bytes() == current
