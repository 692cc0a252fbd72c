"""Item popularity coordinates: bins, cold items, the catalogue, the popularity feature group."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from encoder_service.data.contract import Event
from encoder_service.data.tables import Dataset
from encoder_service.features.build import build_catalog, build_states, fit_schema
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.popularity import popularity_coordinates
from encoder_service.features.schema import FeatureSchema
from encoder_service.features.state import FeatureState
from encoder_service.features.vectorize import Vectorizer

T0 = 1_700_000_000.0


def test_bins_split_the_events_not_the_items() -> None:
    # 100 events: the top item alone holds half of them, so it fills the upper bins' share.
    counts = np.array([50, 20, 10, 10, 5, 5, 0, 0], dtype=float)
    coordinates, cold = popularity_coordinates(counts, bins=4)
    bins = coordinates[:, :4].argmax(axis=1)
    assert coordinates[:, :4].sum(axis=1).tolist() == [1.0] * 8
    # share of events on less popular items: 50 -> 0.5, 20 -> 0.3, 10 -> 0.1, 5 -> 0, 0 -> 0
    assert bins.tolist() == [2, 1, 0, 0, 0, 0, 0, 0]
    logs = np.log1p(counts)
    np.testing.assert_allclose(coordinates[:, 4], (logs - logs.mean()) / logs.std(), rtol=1e-6)
    # an item without training events is exactly as cold as the cold coordinates say
    np.testing.assert_array_equal(coordinates[6], cold)
    assert cold[0] == 1.0 and cold[1:4].sum() == 0.0


def test_equal_counts_share_a_bin_and_bad_counts_are_refused() -> None:
    coordinates, _ = popularity_coordinates(np.full(10, 3.0), bins=5)
    assert (coordinates[:, 0] == 1.0).all()
    np.testing.assert_array_equal(coordinates[:, 5], 0.0)  # no spread: log counts all 0
    with pytest.raises(ValueError):
        popularity_coordinates(np.array([1.0, -1.0]), bins=3)
    with pytest.raises(ValueError):
        popularity_coordinates(np.array([1.0, np.nan]), bins=3)
    with pytest.raises(ValueError):
        popularity_coordinates(np.array([1.0]), bins=0)


def _catalog() -> ItemCatalog:
    taste = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    popularity = np.array([[0, 1, 0.5], [1, 0, -0.5], [0, 1, 0.0]], dtype=np.float32)
    return ItemCatalog(
        ("a", "b", "c"),
        (("x",), ("y",), ()),
        np.hstack([taste, popularity]),
        cold_popularity=(1.0, 0.0, -2.0),
    )


def test_unknown_items_take_their_categories_taste_and_the_cold_popularity() -> None:
    catalog = _catalog()
    assert (catalog.dim, catalog.taste_dim, catalog.popularity_width) == (5, 2, 3)
    _, vector = catalog.lookup("new", ("y",))
    np.testing.assert_array_equal(vector, [0, 1, 1, 0, -2])
    _, vector = catalog.lookup("new")
    np.testing.assert_allclose(vector, [2 / 3, 2 / 3, 1, 0, -2])
    _, vector = catalog.lookup("a")
    np.testing.assert_array_equal(vector, [1, 0, 0, 1, 0.5])


def test_catalogue_bytes_keep_the_popularity_and_the_hash_tells_it_apart() -> None:
    catalog = _catalog()
    restored = ItemCatalog.from_bytes(catalog.to_bytes())
    assert restored.hash == catalog.hash
    assert restored.cold_popularity == catalog.cold_popularity
    plain = ItemCatalog(catalog.item_ids, catalog.categories, catalog.vectors)
    assert plain.hash != catalog.hash
    assert plain.popularity_width == 0 and plain.taste_dim == 5
    # a catalogue written before popularity existed (no cold_popularity array) still reads
    buffer = io.BytesIO(plain.to_bytes())
    with np.load(buffer) as npz:
        assert "cold_popularity" not in npz
    assert ItemCatalog.from_bytes(plain.to_bytes()).hash == plain.hash


def test_schema_records_the_bins_and_keeps_older_hashes() -> None:
    base = dict(
        categories=("a",), event_types=(), contexts=(), profile_fields=(), item_vector_dim=2
    )
    plain, binned = FeatureSchema(**base), FeatureSchema(**base, popularity_bins=4)
    assert "popularity_bins" not in plain.to_dict()
    assert binned.hash != plain.hash
    assert FeatureSchema.from_dict(binned.to_dict()).hash == binned.hash
    group = binned.group("popularity")
    assert [s.name for s in group.segments] == [
        "popularity_7d",
        "popularity_60d",
        "popularity_365d",
        "popularity_log_count",
    ]
    assert binned.input_dim == plain.input_dim + 3 * 4 + 3


def _skewed(seed: int = 0) -> Dataset:
    """60 users picking items with Zipf-like popularity from 50."""
    rng = np.random.default_rng(seed)
    n_items = 50
    weights = 1.0 / np.arange(1, n_items + 1)
    rows = [
        {
            "user_id": f"u{u}",
            "item_id": f"i{rng.choice(n_items, p=weights / weights.sum())}",
            "timestamp": T0 + float(rng.uniform(0, 1e6)),
            "event_type": "rate",
            "weight": float(rng.integers(1, 6)),
            "context": None,
        }
        for u in range(60)
        for _ in range(30)
    ]
    events = pd.DataFrame(rows).sort_values(["user_id", "timestamp"], kind="stable")
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n_items)],
            "categories": [("g",)] * n_items,
            "vector": [None] * n_items,
        }
    )
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(60)]})
    return Dataset(events.reset_index(drop=True), users, items, "skewed", [])


def test_the_popularity_group_is_the_weighted_histogram_of_the_items_picked() -> None:
    dataset = _skewed()
    vectors = np.random.default_rng(1).normal(size=(len(dataset.items), 3)).astype(np.float32)
    catalog = build_catalog(dataset, vectors, popularity_bins=5)
    schema = fit_schema(dataset, item_vector_dim=catalog.taste_dim, popularity_bins=5)
    vectorize = Vectorizer(schema, catalog.hash)
    segments = {s.name: s for g in schema.groups for s in g.segments}
    hist, logs = segments["popularity_365d"], segments["popularity_log_count"]

    # one user, all events at the same time so every horizon weighs them alike
    state = FeatureState()
    picks = [("i0", 2.0), ("i49", 1.0), ("never-seen", 1.0)]
    for item, weight in picks:
        state.apply(Event("u", item, T0, weight=weight), {catalog.hash: catalog})
    x = vectorize([state])[0]
    rows = [catalog.lookup(item)[1][3:] for item, _ in picks]
    expected = sum(w * r for (_, w), r in zip(picks, rows, strict=True)) / 4.0
    np.testing.assert_allclose(x[hist.start : hist.end], expected[:5], rtol=1e-6)
    np.testing.assert_allclose(x[logs.start : logs.end], [expected[5]] * 3, rtol=1e-6)
    assert x[hist.start : hist.end].sum() == pytest.approx(1.0)

    # users who pick like everyone else spread over the bins; uniform picks pile in the lowest
    _, states = build_states(dataset, {catalog.hash: catalog})
    real = vectorize(states)[:, hist.start]
    uniform = FeatureState()
    for k in range(30):
        uniform.apply(Event("bot", f"i{k % 50}", T0 + k), {catalog.hash: catalog})
    assert vectorize([uniform])[0, hist.start] > np.quantile(real, 0.95)
