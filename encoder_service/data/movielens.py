"""MovieLens 100K and 1M (GroupLens) as a :class:`Dataset`.

The releases cannot be redistributed, so the project reads them where the user keeps them. Both
formats go through the same contract checks as any customer's tables; ratings become events of
type ``rating`` whose weight is the rating.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from encoder_service.data.tables import Dataset, dataset_from_frames

EVENT_TYPE = "rating"
PROFILE_FIELDS = ("age", "gender", "occupation", "zip")
_ENCODING = "latin-1"  # titles in u.item and movies.dat are not UTF-8


def load_movielens(path: Path) -> Dataset:
    """Load a MovieLens folder, telling 100K (``u.data``) from 1M (``ratings.dat``).

    Users get the profile fields ``age`` (numeric), ``gender``, ``occupation`` and ``zip``
    (categorical; 1M's occupation is a numeric code that stays a label). Items get their genres
    as categories and the numeric attribute ``release_year`` (100K: from the release date;
    1M: from the year that ends the title; missing where neither gives one).

    Raises:
        FileNotFoundError: if the folder holds neither format.
        ContractError: if a file breaks the input contract.
    """
    path = Path(path)
    if (path / "u.data").is_file():
        return _load_100k(path)
    if (path / "ratings.dat").is_file():
        return _load_1m(path)
    raise FileNotFoundError(f"{path} holds neither MovieLens 100K (u.data) nor 1M (ratings.dat)")


def _load_100k(folder: Path) -> Dataset:
    ratings = _read(folder / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"])
    users = _read(folder / "u.user", "|", ["user_id", *PROFILE_FIELDS])
    genres = _genre_names(folder / "u.genre")
    item_columns = ["item_id", "title", "release_date", "video_release_date", "url", *genres]
    items = _read(folder / "u.item", "|", item_columns, encoding=_ENCODING)
    flags = items[genres].to_numpy(np.int64) == 1
    categories = [tuple(np.asarray(genres)[row]) for row in flags]
    return dataset_from_frames(
        _events(ratings),
        _users(users),
        pd.DataFrame(
            {
                "item_id": items["item_id"],
                "categories": categories,
                "release_year": _year(items["release_date"], r"(\d{4})\s*$"),
            }
        ),
        name="movielens-100k",
        labels={"events": "u.data", "users": "u.user", "items": "u.item"},
    )


def _load_1m(folder: Path) -> Dataset:
    ratings = _read_dat(folder / "ratings.dat", ["user_id", "item_id", "rating", "timestamp"])
    users = _read_dat(folder / "users.dat", ["user_id", "gender", "age", "occupation", "zip"])
    movies = _read_dat(folder / "movies.dat", ["item_id", "title", "genres"])
    return dataset_from_frames(
        _events(ratings),
        _users(users),
        pd.DataFrame(
            {
                "item_id": movies["item_id"],
                "categories": movies["genres"],
                "release_year": _year(movies["title"], r"\((\d{4})\)\s*$"),
            }
        ),
        name="movielens-1m",
        labels={"events": "ratings.dat", "users": "users.dat", "items": "movies.dat"},
    )


def _read(
    source: Path | io.StringIO, separator: str, names: list[str], encoding: str = "utf-8"
) -> pd.DataFrame:
    """A header-less file as text, so the contract checks ids, times and ratings with row
    numbers; only ``age`` is read as a number, to make it a numeric profile field."""
    return pd.read_csv(
        source,
        sep=separator,
        header=None,
        names=names,
        dtype={name: "int64" if name == "age" else "str" for name in names},
        encoding=encoding,
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
    )


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    """1M's ``::``-separated files; swapping the separator for a tab lets the fast C parser
    read them (pandas parses multi-character separators in pure Python)."""
    text = path.read_text(encoding=_ENCODING).replace("::", "\t")
    return _read(io.StringIO(text), "\t", names)


def _genre_names(path: Path) -> list[str]:
    """Genre names in flag order; ``u.genre`` lists ``name|index`` pairs."""
    pairs = [line.rsplit("|", 1) for line in path.read_text(encoding=_ENCODING).splitlines()]
    return [name for name, _ in sorted((p for p in pairs if len(p) == 2), key=lambda p: int(p[1]))]


def _year(text: pd.Series, pattern: str) -> np.ndarray:
    """The four-digit year ``pattern`` captures from each value, NaN where none matches."""
    return text.str.extract(pattern, expand=False).astype(float).to_numpy(np.float64)


def _events(ratings: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ratings["user_id"],
            "item_id": ratings["item_id"],
            "timestamp": ratings["timestamp"],
            "event_type": EVENT_TYPE,
            "weight": ratings["rating"],
        }
    )


def _users(users: pd.DataFrame) -> pd.DataFrame:
    """The profile in one field order for both formats (1M lists gender before age)."""
    return users[["user_id", *PROFILE_FIELDS]]
