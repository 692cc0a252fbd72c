"""Feature state: the online ``apply`` path and the offline batch build must agree."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from encoder_service.data.contract import Event
from encoder_service.data.tables import Dataset
from encoder_service.features.build import build_catalog, build_states, fit_schema
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.schema import OTHER, FeatureSchema, ProfileField, SegmentKind
from encoder_service.features.state import FeatureState, heatmap_cell
from encoder_service.features.vectorize import Vectorizer

DAY = 86_400.0


def _dataset(seed: int = 0, n_users: int = 30, n_items: int = 40) -> Dataset:
    rng = np.random.default_rng(seed)
    cats = ["drama", "comedy", "news", "sport", "music"]
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n_items)],
            "categories": [
                tuple(rng.choice(cats, size=rng.integers(0, 3), replace=False))
                for _ in range(n_items)
            ],
            "vector": [None] * n_items,
        }
    )
    rows = []
    for u in range(n_users):
        for _ in range(rng.integers(1, 25)):
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{rng.integers(n_items)}",
                    "timestamp": float(1_700_000_000 + rng.uniform(0, 400 * DAY)),
                    "event_type": str(rng.choice(["view", "click", "buy"])),
                    "weight": float(rng.choice([0.5, 1.0, 3.0])),
                    "context": None if rng.random() < 0.2 else str(rng.choice(["mobile", "tv"])),
                }
            )
    events = pd.DataFrame(rows).sort_values(["user_id", "timestamp"], kind="stable")
    users = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(n_users)],
            "age": [float(a) if a > 20 else np.nan for a in rng.integers(15, 70, n_users)],
            "gender": [None if g == "x" else g for g in rng.choice(["F", "M", "x"], n_users)],
        }
    )
    return Dataset(
        events=events.reset_index(drop=True), users=users, items=items, name="t", warnings=[]
    )


def _replay(dataset: Dataset, catalogs: dict[str, ItemCatalog], seed: int) -> list[FeatureState]:
    """Apply each user's events one by one, in a shuffled order (late events included)."""
    rng = np.random.default_rng(seed)
    profiles = dataset.users.set_index("user_id")
    states = []
    for user in dataset.users["user_id"]:
        state = FeatureState()
        rows = dataset.events[dataset.events["user_id"] == user]
        for _, row in rows.iloc[rng.permutation(len(rows))].iterrows():
            state.apply(
                Event(
                    user_id=user,
                    item_id=row["item_id"],
                    timestamp=row["timestamp"],
                    event_type=row["event_type"],
                    weight=row["weight"],
                    context=None if pd.isna(row["context"]) else row["context"],
                ),
                catalogs,
            )
        profile = profiles.loc[user]
        state.profile.update({k: (None if pd.isna(v) else v) for k, v in profile.items()})
        states.append(state)
    return states


@pytest.fixture(scope="module", params=[0, 4], ids=["no-popularity", "popularity"])
def built(request):
    dataset = _dataset()
    vectors = np.random.default_rng(1).normal(size=(len(dataset.items), 6)).astype(np.float32)
    catalog = build_catalog(dataset, vectors, popularity_bins=request.param)
    schema = fit_schema(dataset, item_vector_dim=catalog.taste_dim, popularity_bins=request.param)
    return dataset, catalog, schema


def test_replay_in_any_order_equals_the_batch_build(built) -> None:
    dataset, catalog, schema = built
    catalogs = {catalog.hash: catalog}
    _, batch = build_states(dataset, catalogs)
    replayed = _replay(dataset, catalogs, seed=3)
    vectorize = Vectorizer(schema, catalog.hash)
    np.testing.assert_allclose(vectorize(replayed), vectorize(batch), rtol=1e-5, atol=1e-5)
    for a, b in zip(replayed, batch, strict=True):
        assert a.count == b.count
        assert a.t_last == b.t_last and a.t_first == b.t_first
        np.testing.assert_allclose(a.mass, b.mass, rtol=1e-9)
        np.testing.assert_allclose(a.heatmap, b.heatmap, rtol=1e-9, atol=1e-12)
        assert set(a.categories) >= set(b.categories)


def test_state_bytes_round_trip_keeps_the_vector(built) -> None:
    dataset, catalog, schema = built
    _, states = build_states(dataset, {catalog.hash: catalog})
    vectorize = Vectorizer(schema, catalog.hash)
    restored = [FeatureState.from_bytes(s.to_bytes()) for s in states]
    np.testing.assert_allclose(vectorize(restored), vectorize(states), rtol=1e-5, atol=1e-6)
    assert restored[0].profile == states[0].profile


def test_truncated_state_bytes_are_refused(built) -> None:
    dataset, catalog, _ = built
    _, states = build_states(dataset, {catalog.hash: catalog})
    blob = states[0].to_bytes()
    with pytest.raises(ValueError):
        FeatureState.from_bytes(blob[:-4])
    with pytest.raises(ValueError):
        FeatureState.from_bytes(b"XX" + blob[2:])


def test_decay_ages_old_taste_away() -> None:
    catalog = ItemCatalog(("a", "b"), (("drama",), ("sport",)), np.eye(2, dtype=np.float32))
    state = FeatureState()
    t0 = 1_700_000_000.0
    for k in range(10):
        state.apply(Event("u", "a", t0 + k * 3600), {catalog.hash: catalog})
    state.apply(Event("u", "b", t0 + 60 * DAY), {catalog.hash: catalog})
    short, long = 0, 2
    drama, sport = state.categories["drama"], state.categories["sport"]
    # after 60 days the 7-day memory has forgotten drama, the 365-day memory has not
    assert sport[short] > 30 * drama[short]  # 10 * 2**(-60/7) = 0.027
    assert drama[long] > sport[long]


def test_unknown_item_falls_back_to_its_categories_vector() -> None:
    vectors = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    catalog = ItemCatalog(("a", "b", "c"), (("x",), ("y",), ()), vectors)
    cats, vector = catalog.lookup("new", ("y",))
    assert cats == ("y",)
    np.testing.assert_array_equal(vector, [0, 1])
    _, vector = catalog.lookup("new")
    np.testing.assert_allclose(vector, vectors.mean(axis=0))
    restored = ItemCatalog.from_bytes(catalog.to_bytes())
    assert restored.hash == catalog.hash
    assert restored.categories == catalog.categories


def test_vector_layout_follows_the_schema() -> None:
    schema = FeatureSchema(
        categories=("drama", "sport"),
        event_types=("view", "buy"),
        contexts=("mobile",),
        profile_fields=(
            ProfileField("age", True, mean=40.0, std=10.0),
            ProfileField("gender", False, vocabulary=("F", "M")),
        ),
        item_vector_dim=0,
    )
    catalog = ItemCatalog(("a", "b"), (("drama",), ("opera",)), np.zeros((2, 0), np.float32))
    state = FeatureState()
    t = 1_700_000_000.0
    state.apply(Event("u", "a", t, event_type="view", profile={"age": 50.0}), {})
    state.apply(Event("u", "b", t + 1, event_type="rate", context="tv"), {catalog.hash: catalog})
    x = Vectorizer(schema, None)([state])[0]
    segments = {s.name: s for g in schema.groups for s in g.segments}
    for seg in segments.values():
        view = x[seg.start : seg.end]
        if seg.kind is SegmentKind.DISTRIBUTION:
            assert math.isclose(view.sum(), 1.0, rel_tol=1e-5), seg.name
        if seg.kind is SegmentKind.CATEGORICAL:
            assert view.sum() == 1.0
    affinity = x[segments["affinity_7d"].start : segments["affinity_7d"].end]
    # "opera" is not in the vocabulary: its weight lands in the other slot
    assert affinity[schema.category_slots.index(OTHER)] > 0.49
    age = segments["profile.age"]
    assert x[age.start] == pytest.approx(1.0) and x[age.start + 1] == 0.0
    gender = x[segments["profile.gender"].start : segments["profile.gender"].end]
    assert gender[-1] == 1.0  # unknown
    assert heatmap_cell(t) == int(np.argmax(state.heatmap))


def test_schema_hash_is_stable_and_sensitive() -> None:
    base = dict(
        categories=("a", "b"), event_types=(), contexts=(), profile_fields=(), item_vector_dim=4
    )
    one, two = FeatureSchema(**base), FeatureSchema(**base)
    assert one.hash == two.hash
    assert FeatureSchema.from_dict(one.to_dict()).hash == one.hash
    assert FeatureSchema(**{**base, "categories": ("a", "c")}).hash != one.hash
    assert FeatureSchema(**{**base, "item_vector_dim": 8}).hash != one.hash
