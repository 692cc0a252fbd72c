"""Synthetic data: deterministic, valid under the contract, and structured like real behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from encoder_service.data.synthetic import (
    ARCHETYPES,
    DEVICES,
    EVENT_TYPES,
    EVENT_WEIGHTS,
    START_2024,
    generate,
    generate_with_truth,
)
from encoder_service.data.tables import EVENT_COLUMNS, Dataset, load_tables, write_tables

N_USERS = 6_000


@pytest.fixture(scope="module")
def world() -> tuple[Dataset, np.ndarray]:
    return generate_with_truth(N_USERS, seed=11)


@pytest.fixture(scope="module")
def by_event(world: tuple[Dataset, np.ndarray]) -> pd.DataFrame:
    """Events with their user's archetype name, UTC hour and weekday."""
    data, archetype = world
    events = data.events
    user_position = pd.Index(data.users["user_id"]).get_indexer(events["user_id"])
    moments = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    names = np.array([a.name for a in ARCHETYPES])
    return pd.DataFrame(
        {
            "archetype": names[archetype[user_position]],
            "hour": moments.dt.hour.to_numpy(),
            "weekend": moments.dt.day_of_week.to_numpy() >= 5,
            "context": events["context"].to_numpy(),
        }
    )


def _assert_same(a: Dataset, b: Dataset) -> None:
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert a.items["categories"].tolist() == b.items["categories"].tolist()
    pairs = zip(a.items["vector"], b.items["vector"], strict=True)
    assert all(np.array_equal(x, y) for x, y in pairs)


def test_same_seed_same_data_other_seed_other_data() -> None:
    first, truth = generate_with_truth(400, seed=3)
    again, truth_again = generate_with_truth(400, seed=3)
    _assert_same(first, again)
    assert np.array_equal(truth, truth_again)
    _assert_same(generate(400, seed=3), first)
    other = generate(400, seed=4)
    assert not first.events["item_id"].equals(other.events["item_id"])


def test_sizes_and_shape(world: tuple[Dataset, np.ndarray]) -> None:
    data, archetype = world
    events = data.events
    assert list(events.columns) == list(EVENT_COLUMNS)
    assert len(data.users) == N_USERS == len(archetype)
    assert len(data.items) == max(100, N_USERS // 10)
    assert events["user_id"].nunique() == N_USERS
    assert set(events["item_id"]) <= set(data.items["item_id"])
    assert 0.85 * 40 < len(events) / N_USERS < 1.15 * 40
    assert data.profile_fields() == ["age", "gender", "country"]
    assert data.items["categories"].map(len).between(1, 3).all()
    assert {len(v) for v in data.items["vector"]} == {16}


def test_events_sorted_and_inside_the_window() -> None:
    data = generate(500, seed=2, start=1_600_000_000.5, days=30.0)
    events = data.events
    start, end = data.time_window()
    assert start >= 1_600_000_000.5
    assert end < 1_600_000_000.5 + 30 * 86_400
    ordered = events.sort_values(["user_id", "timestamp"], kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(events, ordered)
    assert not events.duplicated().any()


def test_valid_under_the_contract(tmp_path: Path) -> None:
    data = generate(300, seed=5, n_items=120, n_categories=7)
    paths = write_tables(data, tmp_path, "parquet")
    loaded = load_tables(paths["events"], paths["users"], paths["items"])
    assert loaded.warnings == []
    _assert_same(loaded, data)


def test_activity_is_heavy_tailed(world: tuple[Dataset, np.ndarray]) -> None:
    counts = world[0].events.groupby("user_id").size().sort_values(ascending=False)
    top_decile = counts.iloc[: len(counts) // 10].sum() / counts.sum()
    assert top_decile > 0.3
    assert counts.min() == 1
    assert counts.max() <= 25 * 40
    assert counts.median() < counts.mean()


def test_item_popularity_is_heavy_tailed(world: tuple[Dataset, np.ndarray]) -> None:
    counts = world[0].events["item_id"].value_counts()
    assert counts.iloc[: len(counts) // 10].sum() / counts.sum() > 0.3


def test_event_types_and_weights(world: tuple[Dataset, np.ndarray]) -> None:
    events = world[0].events
    assert set(events["event_type"]) == set(EVENT_TYPES)
    weights = dict(zip(EVENT_TYPES, EVENT_WEIGHTS, strict=True))
    assert (events["event_type"].map(weights) == events["weight"]).all()
    assert set(events["context"]) == set(DEVICES)


def test_rhythm_differs_by_archetype(by_event: pd.DataFrame) -> None:
    night = by_event["hour"].isin([22, 23, 0, 1, 2, 3, 4])
    office = by_event["hour"].between(9, 16)
    share = pd.DataFrame({"night": night, "office": office, "weekend": by_event["weekend"]})
    share = share.groupby(by_event["archetype"]).mean()
    assert share.loc["night_owl", "night"] > 0.6 > 0.1 > share.loc["office_hours", "night"]
    assert share.loc["office_hours", "office"] > 0.6 > 0.1 > share.loc["night_owl", "office"]
    assert share.loc["weekend", "weekend"] > 0.6 > 0.15 > share.loc["office_hours", "weekend"]


def test_device_follows_archetype(by_event: pd.DataFrame) -> None:
    favourite = by_event.groupby("archetype")["context"].agg(lambda c: c.value_counts().index[0])
    assert favourite.to_dict() == {
        "commuter": "mobile",
        "evening_tv": "tv",
        "night_owl": "mobile",
        "office_hours": "desktop",
        "weekend": "mobile",
    }


def test_profile_follows_archetype_and_taste(world: tuple[Dataset, np.ndarray]) -> None:
    data, archetype = world
    users = data.users
    age = users["age"].groupby(archetype).mean()
    names = [a.name for a in ARCHETYPES]
    assert age[names.index("evening_tv")] - age[names.index("night_owl")] > 20
    for column in ("age", "gender", "country"):
        assert 0.03 < users[column].isna().mean() < 0.07
    assert set(users["gender"].dropna()) == {"F", "M"}
    assert users["country"].dropna().map(type).eq(str).all()

    first_category = data.items.set_index("item_id")["categories"].map(lambda c: c[0])
    events = data.events.assign(category=first_category.reindex(data.events["item_id"]).values)
    gender = users.set_index("user_id")["gender"]
    events["gender"] = gender.reindex(events["user_id"]).values
    shares = pd.crosstab(events["category"], events["gender"], normalize="columns")
    assert (shares["F"] - shares["M"]).abs().max() > 0.02


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        generate(0)
    with pytest.raises(ValueError):
        generate(10, n_items=5, n_categories=20)


def test_defaults_start_in_2024() -> None:
    start, _ = generate(50).time_window()
    assert START_2024 <= start < START_2024 + 180 * 86_400
