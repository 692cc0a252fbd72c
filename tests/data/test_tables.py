"""Loading, validating and writing the offline tables."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoder_service.data.contract import (
    MAX_PROFILE_FIELDS,
    ContractError,
    parse_timestamp,
    parse_weight,
)
from encoder_service.data.tables import (
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    Dataset,
    dataset_from_frames,
    load_tables,
    write_tables,
)

Write = Callable[[str, str], Path]

EVENTS = """\
    user_id,item_id,timestamp,event_type,weight,context
    u1,i1,1700000000,view,1,mobile
    u1,i2,1700000100,click,2,desktop
    u2,i1,1700000200,view,1,
    """


def refused(*args: Path | None, **kwargs: object) -> str:
    """The message of the ContractError that loading raises; it must be one line."""
    with pytest.raises(ContractError) as info:
        load_tables(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def events_with(write: Write, column: str, value: str, row: int = 2) -> Path:
    """Three good events, with ``column`` of data row ``row`` replaced by ``value``."""
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["i1", "i2", "i1"],
            "timestamp": ["1700000000", "1700000100", "1700000200"],
            "weight": ["1", "2", "1"],
        }
    )
    frame.loc[row - 1, column] = value
    return write("events.csv", frame.to_csv(index=False))


# -- refusals: one line naming file, row and field ------------------------------------------


def test_missing_required_column_names_column_and_file(write: Write) -> None:
    path = write("events.csv", "user_id,item_id\nu1,i1\n")
    assert refused(path) == (
        "events.csv: field 'timestamp': required column is missing "
        "(columns found: user_id, item_id)"
    )


def test_missing_column_in_users_and_items(write: Write) -> None:
    events = write("events.csv", EVENTS)
    users = write("users.csv", "id,age\nu1,3\n")
    items = write("items.csv", "id,categories\ni1,a\n")
    assert refused(events, users).startswith("users.csv: field 'user_id': required column")
    assert refused(events, None, items).startswith("items.csv: field 'item_id': required column")


def test_empty_file_and_header_only(write: Write) -> None:
    assert refused(write("events.csv", "")) == "events.csv: the file is empty (no header row)"
    header_only = write("events.csv", "user_id,item_id,timestamp\n")
    assert refused(header_only) == "events.csv: the file has a header but no rows"
    events = write("events2.csv", EVENTS)
    assert refused(events, write("users.csv", "user_id,age\n")) == (
        "users.csv: the file has a header but no rows"
    )


def test_non_numeric_timestamp(write: Write) -> None:
    assert refused(events_with(write, "timestamp", "abc")) == (
        "events.csv: row 2: field 'timestamp': 'abc' is neither unix seconds nor an ISO-8601 time"
    )


@pytest.mark.parametrize("value", ["-5", "5000000000", "inf"])
def test_timestamp_outside_window(write: Write, value: str) -> None:
    message = refused(events_with(write, "timestamp", value, row=3))
    assert message.startswith("events.csv: row 3: field 'timestamp': ")
    assert message.endswith("is outside the accepted window (1970-01-01 .. 2100-01-01)")


def test_missing_timestamp(write: Write) -> None:
    assert refused(events_with(write, "timestamp", "", row=1)) == (
        "events.csv: row 1: field 'timestamp': missing timestamp"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1", "-1.0 is outside 0 .. 1e+06"),
        ("heavy", "'heavy' is not a number"),
        ("inf", "inf is outside 0 .. 1e+06"),
        ("2e6", "2000000.0 is outside 0 .. 1e+06"),
    ],
)
def test_bad_weight(write: Write, value: str, reason: str) -> None:
    assert refused(events_with(write, "weight", value)) == (
        f"events.csv: row 2: field 'weight': {reason}"
    )


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("user_id", "a b", "'a b' is not a valid id (1-128 of A-Z a-z 0-9 _ . : @ -)"),
        ("item_id", "{x}", "'{x}' is not a valid id (1-128 of A-Z a-z 0-9 _ . : @ -)"),
        ("item_id", "", "missing or not an id"),
        ("user_id", "x" * 129, f"{'x' * 40!r} is not a valid id (1-128 of A-Z a-z 0-9 _ . : @ -)"),
    ],
)
def test_bad_id(write: Write, column: str, value: str, reason: str) -> None:
    assert refused(events_with(write, column, value)) == (
        f"events.csv: row 2: field '{column}': {reason}"
    )


def test_event_of_unknown_user(write: Write) -> None:
    events = write("events.csv", EVENTS)
    users = write("users.csv", "user_id,age\nu1,30\n")
    assert refused(events, users) == (
        "events.csv: row 3: field 'user_id': user 'u2' is not in users.csv"
    )


def test_duplicate_user_and_item(write: Write) -> None:
    events = write("events.csv", EVENTS)
    users = write("users.csv", "user_id,age\nu1,30\nu2,40\nu1,50\n")
    assert refused(events, users) == (
        "users.csv: row 3: field 'user_id': duplicate user id 'u1' (first at row 1)"
    )
    items = write("items.csv", "item_id,categories\ni1,a\ni1,b\n")
    assert refused(events, None, items) == (
        "items.csv: row 2: field 'item_id': duplicate item id 'i1' (first at row 1)"
    )


@pytest.mark.parametrize(
    ("vectors", "reason"),
    [
        (["1 2 3", "1 x 3"], "row 2: field 'vector': 'x' is not a number"),
        (
            ["1 2 3", "1 2"],
            "row 2: field 'vector': has 2 values but the vector of row 1 has 3; "
            "all vectors need one length",
        ),
        (["1 2 3", "1 inf 3"], "row 2: field 'vector': inf is not a finite float32"),
        (["1 2 3", "1 1e39 3"], "row 2: field 'vector': 1e+39 is not a finite float32"),
    ],
)
def test_malformed_vector(write: Write, vectors: list[str], reason: str) -> None:
    events = write("events.csv", EVENTS)
    items = write("items.csv", f"item_id,vector\ni1,{vectors[0]}\ni2,{vectors[1]}\n")
    assert refused(events, None, items) == f"items.csv: {reason}"


def test_malformed_vector_in_parquet_list_column(tmp_path: Path, write: Write) -> None:
    items = tmp_path / "items.parquet"
    pq.write_table(
        pa.table({"item_id": ["i1", "i2", "i3"], "vector": [[1.0, 2.0], None, [1.0]]}), items
    )
    assert refused(write("events.csv", EVENTS), None, items) == (
        "items.parquet: row 3: field 'vector': has 1 values but the vector of row 1 has 2; "
        "all vectors need one length"
    )


def test_infinite_item_attribute_names_column_and_row(write: Write) -> None:
    items = write("items.csv", "item_id,price\ni1,9.5\ni2,-inf\n")
    assert refused(write("events.csv", EVENTS), None, items) == (
        "items.csv: row 2: field 'price': -inf is not a finite number"
    )


def test_infinite_item_attribute_in_parquet_is_refused(tmp_path: Path, write: Write) -> None:
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["i1", "i2"], "year": [1995.0, float("inf")]}), items)
    assert refused(write("events.csv", EVENTS), None, items) == (
        "items.parquet: row 2: field 'year': inf is not a finite number"
    )


def test_numeric_item_columns_become_attributes_and_text_ones_are_ignored(write: Write) -> None:
    items = write(
        "items.csv",
        "item_id,title,price,year,code\ni1,Heat,9.5,1995,A1\ni2,Up,,2009,7\n",
    )
    data = load_tables(write("events.csv", EVENTS), None, items)
    assert data.item_attributes() == ["price", "year"]
    assert list(data.items.columns) == [*ITEM_COLUMNS, "price", "year"]
    np.testing.assert_array_equal(data.items["price"], [9.5, np.nan])
    np.testing.assert_array_equal(data.items["year"], [1995.0, 2009.0])


def test_text_field_too_long(write: Write) -> None:
    path = write("events.csv", f"user_id,item_id,timestamp,event_type\nu1,i1,1,{'v' * 129}\n")
    assert refused(path) == "events.csv: row 1: field 'event_type': longer than 128 characters"


def test_infinite_numeric_profile_value(write: Write) -> None:
    users = write("users.csv", "user_id,age\nu1,30\nu2,inf\n")
    assert refused(write("events.csv", EVENTS), users) == (
        "users.csv: row 2: field 'age': not a finite number"
    )


def test_too_many_profile_columns(write: Write) -> None:
    columns = ",".join(f"f{i}" for i in range(MAX_PROFILE_FIELDS + 1))
    values = ",".join("1" for _ in range(MAX_PROFILE_FIELDS + 1))
    users = write("users.csv", f"user_id,{columns}\nu1,{values}\nu2,{values}\n")
    assert refused(write("events.csv", EVENTS), users) == (
        f"users.csv: field 'profile': {MAX_PROFILE_FIELDS + 1} profile columns; "
        f"at most {MAX_PROFILE_FIELDS}"
    )


def test_unsupported_suffix_and_ragged_csv(write: Write) -> None:
    assert refused(write("events.json", "{}")) == (
        "events.json: unsupported file type; use .csv, .csv.gz, .tsv or .parquet"
    )
    ragged = write("events.csv", "user_id,item_id,timestamp\nu1,i1,1,extra\n")
    assert refused(ragged).startswith("events.csv: CSV parse error: Expected 3 columns, got 4")


def test_parquet_rows_are_counted_from_one(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    timestamps = [1.7e9, 1.7e9 + 1, 1.7e9 + 2, 1.7e9 + 3, -1.0]
    pq.write_table(
        pa.table({"user_id": ["u"] * 5, "item_id": ["i"] * 5, "timestamp": timestamps}), path
    )
    assert refused(path) == (
        "events.parquet: row 5: field 'timestamp': -1.0 is outside the accepted window "
        "(1970-01-01 .. 2100-01-01)"
    )


def test_first_bad_row_of_a_large_file_is_named(tmp_path: Path) -> None:
    n = 200_000
    timestamps = (1_700_000_000 + np.arange(n)).astype(str).astype(object)
    timestamps[150_000] = "soon"
    timestamps[180_000] = "later"
    frame = pd.DataFrame({"user_id": "u1", "item_id": "i1", "timestamp": timestamps})
    path = tmp_path / "events.csv.gz"
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, index=False)
    assert refused(path) == (
        "events.csv.gz: row 150001: field 'timestamp': 'soon' is neither unix seconds nor an "
        "ISO-8601 time"
    )


# -- the column checks agree with the contract's scalar rules --------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "1700000000",
        "1.7e9",
        " 1700000000 ",
        "+1700000000",
        "2024-01-01T00:00:00Z",
        "2024-01-01 12:30",
        "2024-01-01T00:00:00+02:00",
        "2024-01-01",
        "1_700_000_000",
        "nan",
        "4102444800",
        "0",
    ],
)
def test_timestamps_match_the_contract(write: Write, value: str) -> None:
    path = events_with(write, "timestamp", value, row=1)
    try:
        expected = parse_timestamp(value)
    except ContractError as error:
        assert refused(path) == f"events.csv: row 1: {error}"
    else:
        events = load_tables(path).events
        assert events.loc[events["item_id"] == "i1"].iloc[0]["timestamp"] == expected


@pytest.mark.parametrize("value", ["0", " 2.5 ", "nan", "NaN", "1e6", "1_0", ".5", "   "])
def test_weights_match_the_contract(write: Write, value: str) -> None:
    events = load_tables(events_with(write, "weight", value, row=1)).events
    assert events.iloc[0]["weight"] == parse_weight(value)


def test_missing_weight_and_event_type_take_defaults(write: Write) -> None:
    path = write("events.csv", "user_id,item_id,timestamp,weight,event_type\nu1,i1,1,,\n")
    row = load_tables(path).events.iloc[0]
    assert (row["weight"], row["event_type"], row["context"]) == (1.0, "interaction", None)


def test_iso_column_converts_like_the_contract(write: Write) -> None:
    stamps = ["2024-03-01T10:00:00Z", "2024-03-01T12:00:00+01:00", "2024-03-02 08:15:30"]
    body = "".join(f"u1,i{i},{stamp}\n" for i, stamp in enumerate(stamps))
    events = load_tables(write("events.csv", "user_id,item_id,timestamp\n" + body)).events
    assert events["timestamp"].tolist() == sorted(parse_timestamp(s) for s in stamps)


# -- what a loaded data set looks like ---------------------------------------------------------


def test_loaded_dataset_shape_and_types(write: Write) -> None:
    events = write("events.csv", EVENTS)
    users = write("users.csv", "user_id,age,gender\nu1,30, F \nu2,,\nu3,41,M\n")
    items = write("items.csv", "item_id,categories,vector\ni1,a|b|a,0.5 1.5\ni9,c,\n")
    data = load_tables(events, users, items, name="tiny")
    assert list(data.events.columns) == list(EVENT_COLUMNS)
    assert isinstance(data.events.index, pd.RangeIndex)
    assert data.events["user_id"].dtype == "str"
    assert data.events["timestamp"].dtype == np.float64
    assert data.events["weight"].dtype == np.float64
    assert data.events["context"].dtype == object
    assert data.events["context"].tolist() == ["mobile", "desktop", None]
    assert data.name == "tiny"
    assert data.profile_fields() == ["age", "gender"]
    assert data.users["age"].dtype == np.float64
    assert data.users["gender"].tolist() == ["F", None, "M"]
    assert data.time_window() == (1_700_000_000.0, 1_700_000_200.0)
    assert list(data.items.columns) == list(ITEM_COLUMNS)
    item = data.items.set_index("item_id")
    assert item.loc["i1", "categories"] == ("a", "b")
    assert item.loc["i1", "vector"].dtype == np.float32
    assert item.loc["i1", "vector"].tolist() == [0.5, 1.5]
    assert item.loc["i9", "vector"] is None
    assert item.loc["i2", "categories"] == ()
    assert data.warnings == [
        "1 items referenced by events are not in items.csv; they get no categories"
    ]


def test_ids_stay_strings(write: Write, tmp_path: Path) -> None:
    csv_events = write("events.csv", "user_id,item_id,timestamp\n007,0042,1\n")
    row = load_tables(csv_events).events.iloc[0]
    assert (row["user_id"], row["item_id"]) == ("007", "0042")
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": [7], "item_id": [42.0], "timestamp": [1]}), parquet)
    row = load_tables(parquet).events.iloc[0]
    assert (row["user_id"], row["item_id"]) == ("7", "42")


def test_fractional_id_from_typed_file_is_refused(tmp_path: Path) -> None:
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": [7.5], "item_id": [1], "timestamp": [1]}), parquet)
    assert refused(parquet) == "events.parquet: row 1: field 'user_id': 7.5 is not a valid id"


def test_events_sorted_stably_by_user_then_time(write: Write) -> None:
    body = "u9,a,5\nu10,b,9\nu10,c,3\nu10,d,9\nu9,e,5\n"
    events = load_tables(write("events.csv", "user_id,item_id,timestamp\n" + body)).events
    assert events["item_id"].tolist() == ["c", "b", "d", "a", "e"]
    assert events["user_id"].tolist() == ["u10", "u10", "u10", "u9", "u9"]


def test_exact_duplicates_dropped_with_count(write: Write) -> None:
    body = "u1,i1,5,2\nu1,i1,5,2\nu1,i1,5,3\nu2,i1,5,2\nu1,i1,5,2\n"
    data = load_tables(write("events.csv", "user_id,item_id,timestamp,weight\n" + body))
    assert data.events["weight"].tolist() == [2.0, 3.0, 2.0]
    assert data.warnings == ["2 exact duplicate event rows in events.csv were dropped"]


def test_users_and_items_derived_from_events(write: Write) -> None:
    data = load_tables(write("events.csv", "user_id,item_id,timestamp\nb,y,1\na,x,2\nb,x,3\n"))
    assert data.users["user_id"].tolist() == ["a", "b"]
    assert data.profile_fields() == []
    assert data.items["item_id"].tolist() == ["x", "y"]
    assert data.items["categories"].tolist() == [(), ()]
    assert data.items["vector"].tolist() == [None, None]
    assert data.warnings == []


def test_users_without_events_are_kept(write: Write) -> None:
    users = write("users.csv", "user_id,plan\nu1,free\nu2,pro\nu3,free\n")
    data = load_tables(write("events.csv", EVENTS), users)
    assert data.users["user_id"].tolist() == ["u1", "u2", "u3"]
    assert data.users["plan"].dtype == object


def test_profile_types_follow_the_file(tmp_path: Path, write: Write) -> None:
    csv_users = write("users.csv", "user_id,zip,code\nu1,01234,A1\nu2, 98765 ,\n")
    csv_data = load_tables(write("events.csv", EVENTS), csv_users)
    assert csv_data.users["zip"].tolist() == [1234.0, 98765.0]
    assert csv_data.users["code"].tolist() == ["A1", None]
    parquet_users = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "zip": ["01234", "98765"]}), parquet_users)
    parquet_data = load_tables(write("events2.csv", EVENTS), parquet_users)
    assert parquet_data.users["zip"].tolist() == ["01234", "98765"]


def test_tsv_and_extra_columns(write: Write) -> None:
    path = write("events.tsv", "user_id\titem_id\ttimestamp\tnote\nu1\ti1\t1\tignored\n")
    assert list(load_tables(path).events.columns) == list(EVENT_COLUMNS)


def test_frames_validate_like_files() -> None:
    events = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i1", "i2"], "timestamp": [1, -3]})
    with pytest.raises(ContractError, match=r"^events: row 2: field 'timestamp': "):
        dataset_from_frames(events, name="frames")


# -- write_tables round trip -----------------------------------------------------------------


def _handmade() -> Dataset:
    events = pd.DataFrame(
        {
            "user_id": ["007", "007", "u2", "u3"],
            "item_id": ["i1", "i2", "i1", "i3"],
            "timestamp": [1.7e9, 1.7e9 + 0.25, 1.6e9, 1.65e9],
            "event_type": ["view", "buy", "view", "view"],
            "weight": [1.0, 3.5, 1.0, 0.0],
            "context": ["mobile", None, "tv", None],
        }
    )
    users = pd.DataFrame(
        {
            "user_id": ["007", "u2", "u3", "u4"],
            "age": [30.0, np.nan, 41.5, 20.0],
            "tier": ["gold", None, "basic", "basic"],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3", "i4"],
            "categories": [("a", "b"), (), ("c",), ("a",)],
            "vector": [
                np.array([0.1, -2.5, 3e-7], np.float32),
                None,
                np.array([1, 2, 3], np.float32),
                np.array([0, 0, 1e30], np.float32),
            ],
            "year": [1995.0, np.nan, 2001.0, 1950.5],
        }
    )
    return dataset_from_frames(events, users, items, name="handmade")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    original = _handmade()
    paths = write_tables(original, tmp_path, fmt)
    assert {name: path.name for name, path in paths.items()} == {
        name: f"{name}.{fmt}" for name in ("events", "users", "items")
    }
    loaded = load_tables(paths["events"], paths["users"], paths["items"], name="handmade")
    pd.testing.assert_frame_equal(loaded.events, original.events)
    pd.testing.assert_frame_equal(loaded.users, original.users)
    assert loaded.items["item_id"].tolist() == original.items["item_id"].tolist()
    assert loaded.items["categories"].tolist() == original.items["categories"].tolist()
    for got, want in zip(loaded.items["vector"], original.items["vector"], strict=True):
        assert (got is None and want is None) or np.array_equal(got, want)
    np.testing.assert_array_equal(loaded.items["year"], original.items["year"])
    assert loaded.warnings == []


def test_write_refuses_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        write_tables(_handmade(), tmp_path, "json")  # type: ignore[arg-type]
