"""Numeric item attributes: standardised into the catalogue, averaged into their own group."""

from __future__ import annotations

import numpy as np
import pandas as pd

from encoder_service.data.contract import Event
from encoder_service.data.tables import dataset_from_frames
from encoder_service.features.build import build_catalog, build_states, fit_schema
from encoder_service.features.state import FeatureState
from encoder_service.features.vectorize import Vectorizer

T0 = 1_700_000_000.0


def _dataset():
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3"],
            "item_id": ["i1", "i2", "i2", "i3", "i4"],
            "timestamp": [T0, T0, T0, T0 + 10, T0],
            "weight": [1.0, 3.0, 1.0, 1.0, 2.0],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3", "i4"],
            "categories": ["a", "a", "b", "b"],
            "year": [1990.0, 2000.0, 2010.0, None],
        }
    )
    return dataset_from_frames(events, items=items, name="attributes")


def test_attributes_are_standardised_into_the_catalogue_and_averaged_per_user() -> None:
    dataset = _dataset()
    vectors = np.eye(4, 2, dtype=np.float32)
    catalog = build_catalog(dataset, vectors, popularity_bins=3)
    schema = fit_schema(dataset, item_vector_dim=2, popularity_bins=3)
    assert schema.item_attributes == ("year",)
    assert schema.to_dict()["item_attributes"] == ["year"]
    year = catalog.vectors[:, 2]
    np.testing.assert_allclose(year, [-np.sqrt(1.5), 0.0, np.sqrt(1.5), 0.0], rtol=1e-6)
    assert catalog.taste_dim == 3 and catalog.popularity_width == 4

    _, states = build_states(dataset, {catalog.hash: catalog})
    x = Vectorizer(schema, catalog.hash)(states)
    seg = {s.name: s for g in schema.groups for s in g.segments}["item_attributes_365d"]
    # u1: weights 1 and 3 on 1990 and 2000; u2: 2000 and 2010 (ten seconds apart, equal decay);
    # u3: an item without a year counts as the mean
    expected = [-np.sqrt(1.5) / 4, np.sqrt(1.5) / 2, 0.0]
    np.testing.assert_allclose(x[:, seg.start], expected, rtol=1e-5, atol=1e-7)

    # an item the catalogue does not know takes its category's mean year online
    state = FeatureState()
    state.apply(Event("u", "new", T0, categories=("a",)), {catalog.hash: catalog})
    online = Vectorizer(schema, catalog.hash)([state])[0]
    np.testing.assert_allclose(online[seg.start], -np.sqrt(1.5) / 2, rtol=1e-5)
