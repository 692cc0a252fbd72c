"""Ciao loader: deduplication rules on a small file, then the real release."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from encoder_service.data.ciao import RATINGS_FILE, TRUST_FILE, load_ciao, load_trust_edges
from encoder_service.data.contract import ContractError
from encoder_service.data.tables import Dataset

HEADER = "user_id,item_id,category_id,rating,helpfulness,timestamp,category\n"
ROWS = [
    "1,10,1,5,2,100,DVDs",
    "1,10,1,5,2,100,DVDs",  # exact copy of the row above
    "1,10,1,5,3,100,DVDs",  # same rating, another helpfulness count: the same event
    "1,10,1,2,1,300,DVDs",  # the user changed their mind later: this one stays
    "1,11,4,4,1,200,Music",
    "2,11,4,3,1,200,Music",
    "2,11,4,1,1,200,Music",  # same time: the last in the file stays
    "2,12,8,4,1,150,Books",
    "3,12,9,4,1,160,Health",
    "4,12,9,5,1,170,Health",
]


def _write_gz(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    return path


def test_dedupe_keeps_latest_rating(tmp_path: Path) -> None:
    _write_gz(tmp_path / "ciao", RATINGS_FILE, HEADER + "\n".join(ROWS) + "\n")
    data = load_ciao(tmp_path / "ciao")
    assert data.events[["user_id", "item_id", "timestamp", "weight"]].values.tolist() == [
        ["1", "11", 200.0, 4.0],
        ["1", "10", 300.0, 2.0],
        ["2", "12", 150.0, 4.0],
        ["2", "11", 200.0, 1.0],
        ["3", "12", 160.0, 4.0],
        ["4", "12", 170.0, 5.0],
    ]
    assert set(data.events["event_type"]) == {"rating"}
    assert data.warnings == [
        f"2 exact duplicate event rows in {RATINGS_FILE} were dropped",
        f"2 repeated (user, item) ratings in {RATINGS_FILE} were dropped, keeping the latest",
    ]
    categories = dict(zip(data.items["item_id"], data.items["categories"], strict=True))
    assert categories == {"10": ("DVDs",), "11": ("Music",), "12": ("Health", "Books")}
    assert data.users["user_id"].tolist() == ["1", "2", "3", "4"]


def test_bad_row_is_named_as_in_the_file(tmp_path: Path) -> None:
    rows = [*ROWS[:4], "1,13,1,4,1,yesterday,DVDs"]
    path = _write_gz(tmp_path, RATINGS_FILE, HEADER + "\n".join(rows) + "\n")
    with pytest.raises(ContractError) as info:
        load_ciao(path)
    assert str(info.value) == (
        f"{RATINGS_FILE}: row 5: field 'timestamp': 'yesterday' is neither unix seconds nor an "
        "ISO-8601 time"
    )


def test_missing_column(tmp_path: Path) -> None:
    path = _write_gz(tmp_path, RATINGS_FILE, "user_id,item_id,rating,timestamp\n1,2,3,4\n")
    with pytest.raises(ContractError) as info:
        load_ciao(path)
    assert str(info.value) == f"{RATINGS_FILE}: field 'category': required column is missing"


def test_trust_edges_small(tmp_path: Path) -> None:
    path = _write_gz(tmp_path, TRUST_FILE, "truster,trustee\n1,2\n2,1\n07,3\n")
    edges = load_trust_edges(path)
    assert edges.values.tolist() == [["1", "2"], ["2", "1"], ["07", "3"]]
    bad = _write_gz(tmp_path, "bad.csv.gz", "truster,trustee\n1,2\n2,x y\n")
    with pytest.raises(ContractError, match=r"^bad.csv.gz: row 2: field 'trustee': 'x y' is not"):
        load_trust_edges(bad)


@pytest.fixture(scope="module")
def ciao(ciao_dir: Path) -> Dataset:
    return load_ciao(ciao_dir)


@pytest.mark.realdata
def test_real_ciao_counts(ciao: Dataset) -> None:
    # 284,086 rows: 290 repeat an event exactly (190 byte-identical, 100 differ only in the
    # helpfulness count), 1,146 more repeat a (user, item) pair; 1,436 dropped in all.
    assert len(ciao.events) == 284_086 - 290 - 1_146
    assert ciao.warnings == [
        f"290 exact duplicate event rows in {RATINGS_FILE} were dropped",
        f"1146 repeated (user, item) ratings in {RATINGS_FILE} were dropped, keeping the latest",
    ]
    assert not ciao.events.duplicated(["user_id", "item_id"]).any()
    assert (len(ciao.users), len(ciao.items)) == (7_375, 105_114)
    assert ciao.profile_fields() == []


@pytest.mark.realdata
def test_real_ciao_items_and_latest_rating(ciao: Dataset) -> None:
    categories = {name for names in ciao.items["categories"] for name in names}
    assert len(categories) == 28
    assert ciao.items["categories"].map(len).between(1, 3).all()
    events = ciao.events
    repeated = events.loc[(events["user_id"] == "1") & (events["item_id"] == "248")]
    assert repeated[["timestamp", "weight"]].values.tolist() == [[1286694000.0, 3.0]]


@pytest.mark.realdata
def test_real_trust_network(ciao_dir: Path, ciao: Dataset) -> None:
    edges = load_trust_edges(ciao_dir)
    assert len(edges) == 111_781
    assert list(edges.columns) == ["truster", "trustee"]
    assert edges["truster"].dtype == "str"
    known = set(ciao.users["user_id"])
    assert edges["truster"].isin(known).mean() > 0.5
