"""The item-set reconstruction's targets: which items, or how much each."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from encoder_service.data.tables import dataset_from_frames
from encoder_service.training.pipeline import interaction_matrix


@pytest.fixture
def dataset():
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b", "b"],
            "item_id": ["x", "y", "y", "z", "x", "z"],
            "timestamp": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0],
            # a rates y twice (4 then 2) and z with weight 0; b rates x 5, z 1
            "weight": [3.0, 4.0, 2.0, 0.0, 5.0, 1.0],
        }
    )
    return dataset_from_frames(events, name="tiny")


def _dense(dataset, users: list[str], target: str) -> pd.DataFrame:
    matrix = interaction_matrix(dataset, users, target)  # type: ignore[arg-type]
    items = dataset.items["item_id"].astype(str)
    return pd.DataFrame(matrix.toarray(), index=users, columns=items)


def test_presence_marks_every_item_with_an_event(dataset) -> None:
    table = _dense(dataset, ["a", "b"], "presence")
    expected = {"a": {"x": 1, "y": 1, "z": 1}, "b": {"x": 1, "y": 0, "z": 1}}
    assert table.to_dict(orient="index") == expected


def test_weight_is_the_mean_event_weight_per_item(dataset) -> None:
    table = _dense(dataset, ["a", "b"], "weight")
    # Repeat events average (y: 4 and 2 -> 3) instead of adding up; a weight-0 event adds no mass.
    expected = {"a": {"x": 3, "y": 3, "z": 0}, "b": {"x": 5, "y": 0, "z": 1}}
    assert table.to_dict(orient="index") == expected
    assert interaction_matrix(dataset, ["a", "b"], "weight").dtype == np.float32


def test_rows_follow_the_requested_users_and_skip_unknown_ones(dataset) -> None:
    table = _dense(dataset, ["b", "nobody"], "weight")
    assert table.loc["b"].tolist() == [5, 0, 1]
    assert table.loc["nobody"].tolist() == [0, 0, 0]


def test_an_unknown_target_is_refused(dataset) -> None:
    with pytest.raises(ValueError, match="'presence' or 'weight'"):
        interaction_matrix(dataset, ["a"], "rating")  # type: ignore[arg-type]
