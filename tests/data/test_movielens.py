"""MovieLens loaders: the real 100K release, and a small file in the 1M format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from encoder_service.data.contract import ContractError
from encoder_service.data.movielens import load_movielens
from encoder_service.data.tables import Dataset

GENRES_100K = 19


@pytest.fixture(scope="module")
def ml100k(movielens_100k_dir: Path) -> Dataset:
    return load_movielens(movielens_100k_dir)


@pytest.mark.realdata
def test_100k_sizes(ml100k: Dataset) -> None:
    assert (len(ml100k.events), len(ml100k.users), len(ml100k.items)) == (100_000, 943, 1_682)
    assert ml100k.name == "movielens-100k"
    assert ml100k.warnings == []
    assert ml100k.events.groupby("user_id").size().min() >= 20


@pytest.mark.realdata
def test_100k_events(ml100k: Dataset) -> None:
    events = ml100k.events
    assert set(events["event_type"]) == {"rating"}
    assert sorted(events["weight"].unique()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    start, end = (pd.Timestamp(t, unit="s") for t in ml100k.time_window())
    assert start.date().isoformat() == "1997-09-20"
    assert end.date().isoformat() == "1998-04-22"
    first = events.loc[(events["user_id"] == "196") & (events["item_id"] == "242")]
    assert first[["timestamp", "weight"]].values.tolist() == [[881250949.0, 3.0]]


@pytest.mark.realdata
def test_100k_users(ml100k: Dataset) -> None:
    users = ml100k.users.set_index("user_id")
    assert ml100k.profile_fields() == ["age", "gender", "occupation", "zip"]
    assert users["age"].dtype == np.float64
    assert (users["age"].min(), users["age"].max()) == (7.0, 73.0)
    assert users["gender"].value_counts().to_dict() == {"M": 670, "F": 273}
    assert users["occupation"].nunique() == 21
    assert users.loc["1"].tolist() == [24.0, "M", "technician", "85711"]
    assert users["zip"].map(type).eq(str).all()


@pytest.mark.realdata
def test_100k_items_carry_genres(ml100k: Dataset) -> None:
    items = ml100k.items.set_index("item_id")
    genres = {name for names in items["categories"] for name in names}
    assert len(genres) == GENRES_100K
    assert items.loc["1", "categories"] == ("Animation", "Children's", "Comedy")
    assert items["vector"].isna().all()


def _write_1m(folder: Path) -> Path:
    folder.mkdir()
    (folder / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
        "2::3408::4::978300275\n",
        encoding="latin-1",
    )
    (folder / "users.dat").write_text(
        "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n", encoding="latin-1"
    )
    (folder / "movies.dat").write_text(
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "3408::Erin Brockovich (2000)::Drama\n"
        "3410::Soft Fruit (1999)::Comedy\n"
        "3411::Léon (1994)::Crime|Drama|Thriller\n",
        encoding="latin-1",
    )
    return folder


def test_1m_format(tmp_path: Path) -> None:
    data = load_movielens(_write_1m(tmp_path / "ml-1m"))
    assert data.name == "movielens-1m"
    assert data.events[["user_id", "item_id", "weight"]].values.tolist() == [
        ["1", "1193", 5.0],
        ["1", "661", 3.0],
        ["2", "1193", 4.0],
        ["2", "3408", 4.0],
    ]
    assert data.events["timestamp"].tolist() == [978300760.0, 978302109.0, 978298413.0, 978300275.0]
    users = data.users.set_index("user_id")
    assert data.profile_fields() == ["age", "gender", "occupation", "zip"]
    assert users["age"].tolist() == [1.0, 56.0, 25.0]
    assert users["occupation"].tolist() == ["10", "16", "15"]
    assert users.loc["3", "zip"] == "55117"
    items = data.items.set_index("item_id")
    assert items.loc["661", "categories"] == ("Animation", "Children's", "Musical")
    assert items.loc["3411", "categories"] == ("Crime", "Drama", "Thriller")
    assert len(items) == 5


def test_1m_rating_error_names_file_and_row(tmp_path: Path) -> None:
    folder = _write_1m(tmp_path / "ml-1m")
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n1::661::-3::978302109\n")
    with pytest.raises(ContractError) as info:
        load_movielens(folder)
    assert str(info.value) == "ratings.dat: row 2: field 'weight': -3.0 is outside 0 .. 1e+06"


def test_unknown_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither MovieLens 100K"):
        load_movielens(tmp_path)
