"""Ciao product reviews (Tang et al.) as a :class:`Dataset`, plus its trust network.

Ciao has no demographics but spans 28 product categories, which makes it the real data set for
cross-domain questions. Its ratings file repeats rows and (user, item) pairs; a user who rates an
item twice changed their mind, so only the latest rating is kept.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from encoder_service.data.contract import ContractError
from encoder_service.data.tables import Dataset, dataset_from_frames, id_column, read_table

RATINGS_FILE = "ratings_with_timestamp.csv.gz"
TRUST_FILE = "trustnetwork.csv.gz"
EVENT_TYPE = "rating"
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp", "category")
TRUST_COLUMNS = ("truster", "trustee")


def load_ciao(path: Path) -> Dataset:
    """Load the ratings (a Ciao folder or the ratings file itself) as rating events.

    Events that repeat exactly (same user, item, time and rating; Ciao also repeats rows whose
    helpfulness count differs) are dropped, then each (user, item) pair keeps its latest rating
    (the last in file order among equal times). An item's categories are the category names its
    ratings carry, most frequent first. The warnings report both counts.

    Raises:
        ContractError: if the file lacks a column or breaks the input contract (rows are named
            as in the file, since validation runs before deduplication).
    """
    file = _file(Path(path), RATINGS_FILE)
    raw = _require(read_table(file), RATING_COLUMNS, file)
    events = pd.DataFrame(
        {
            "user_id": raw["user_id"],
            "item_id": raw["item_id"],
            "timestamp": raw["timestamp"],
            "event_type": EVENT_TYPE,
            "weight": raw["rating"],
        }
    )
    dataset = dataset_from_frames(
        events,
        None,
        _items(raw),
        name="ciao",
        labels={"events": file.name, "items": f"items derived from {file.name}"},
    )
    # events are sorted by (user, time) with ties in file order, so the last copy is the latest
    superseded = dataset.events.duplicated(["user_id", "item_id"], keep="last").to_numpy()
    dataset.events = dataset.events[~superseded].reset_index(drop=True)
    dataset.warnings.append(
        f"{int(superseded.sum())} repeated (user, item) ratings in {file.name} were dropped, "
        "keeping the latest"
    )
    return dataset


def load_trust_edges(path: Path) -> pd.DataFrame:
    """The directed trust graph (a Ciao folder or the trust file itself): who trusts whom.

    Returns:
        Columns ``truster`` and ``trustee``, user ids as strings, one row per edge.
    """
    file = _file(Path(path), TRUST_FILE)
    raw = _require(read_table(file), TRUST_COLUMNS, file)
    return pd.DataFrame(
        {column: id_column(raw[column], column, file.name) for column in TRUST_COLUMNS}
    )


def _require(raw: pd.DataFrame, columns: tuple[str, ...], file: Path) -> pd.DataFrame:
    for column in columns:
        if column not in raw.columns:
            raise ContractError("required column is missing", field=column, location=file.name)
    return raw


def _file(path: Path, name: str) -> Path:
    return path / name if path.is_dir() else path


def _items(ratings: pd.DataFrame) -> pd.DataFrame:
    """One row per item; a few items carry more than one category across their ratings."""
    counts = ratings.groupby(["item_id", "category"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values("n", ascending=False, kind="stable")
    categories = counts.groupby("item_id", sort=False)["category"].agg(tuple)
    return pd.DataFrame({"item_id": categories.index, "categories": categories.to_numpy()})
