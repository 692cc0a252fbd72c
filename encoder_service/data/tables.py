"""The three offline tables (events, users, items) as one validated :class:`Dataset`.

Every value goes through the rules of :mod:`encoder_service.data.contract`, so that what the API
refuses online is refused here too. The checks run on whole columns (pandas, numpy, Arrow) so
that tens of millions of rows validate in seconds; the few rows a column check refuses are handed
to the per-value contract function, which either accepts them (a rarer spelling the column check
does not cover) or raises the one-line message that names file, row and field.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from encoder_service.data.contract import (
    CATEGORY_SEPARATOR,
    DEFAULT_EVENT_TYPE,
    EVENT_REQUIRED_COLUMNS,
    ID_PATTERN,
    ITEM_REQUIRED_COLUMNS,
    MAX_ITEM_ATTRIBUTES,
    MAX_PROFILE_FIELDS,
    MAX_TEXT_LENGTH,
    MAX_TIMESTAMP,
    MAX_WEIGHT,
    MIN_TIMESTAMP,
    USER_REQUIRED_COLUMNS,
    ContractError,
    check_id,
    parse_categories,
    parse_profile_value,
    parse_text,
    parse_timestamp,
    parse_weight,
)

EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "event_type", "weight", "context")
ITEM_COLUMNS = ("item_id", "categories", "vector")
TABLES = ("events", "users", "items")

_CSV_SEPARATORS = {".csv": ",", ".csv.gz": ",", ".tsv": "\t", ".tsv.gz": "\t"}
_EPOCH = pd.Timestamp(0, tz="UTC")
_PLAIN_NUMBER = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"


@dataclass
class Dataset:
    """Validated events, users and items, in the shape the feature code expects.

    ``events`` has exactly the columns of :data:`EVENT_COLUMNS` (ids and event type as strings,
    ``timestamp`` and ``weight`` float64, ``context`` a string or None), sorted stably by
    ``(user_id, timestamp)``. ``users`` has one row per user, ``user_id`` then the profile
    columns (float64 when numeric, str or None when categorical). ``items`` has one row per item
    with ``categories`` (a tuple of names) and ``vector`` (a float32 array or None), then one
    float64 column per numeric item attribute (NaN where an item has no value).
    """

    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    name: str
    warnings: list[str] = field(default_factory=list)

    def profile_fields(self) -> list[str]:
        """Names of the profile columns, in table order."""
        return [column for column in self.users.columns if column != "user_id"]

    def item_attributes(self) -> list[str]:
        """Names of the numeric item attribute columns, in table order."""
        return [column for column in self.items.columns if column not in ITEM_COLUMNS]

    def time_window(self) -> tuple[float, float]:
        """First and last event time, unix seconds."""
        timestamps = self.events["timestamp"]
        return float(timestamps.min()), float(timestamps.max())


def load_tables(
    events: Path,
    users: Path | None = None,
    items: Path | None = None,
    *,
    name: str | None = None,
) -> Dataset:
    """Read and validate the offline tables (CSV, gzipped CSV, TSV or Parquet, by suffix).

    CSV carries no types, so its ids stay strings and a users column is numeric exactly when
    every non-empty value parses as a number; Parquet columns keep their declared types.

    Args:
        events: The events table.
        users: The optional users table; when given, every event's user must be in it.
        items: The optional items table; items that events reference but it lacks are added
            without categories (with a warning).
        name: The data set's name; defaults to the name of the folder holding ``events``.

    Raises:
        ContractError: One line naming file, row and field of the first value that breaks the
            contract.
    """
    events_path = Path(events)
    users_path = None if users is None else Path(users)
    items_path = None if items is None else Path(items)
    user_frame = None
    if users_path is not None:
        user_frame = read_table(users_path)
        if _is_csv(users_path):
            user_frame = _infer_numeric_profile(user_frame)
    return dataset_from_frames(
        read_table(events_path),
        user_frame,
        read_table(items_path) if items_path is not None else None,
        name=name or events_path.resolve().parent.name,
        labels={
            "events": events_path.name,
            "users": users_path.name if users_path is not None else "users",
            "items": items_path.name if items_path is not None else "items",
        },
    )


def read_table(path: Path) -> pd.DataFrame:
    """One table as a DataFrame: every CSV column as strings (so "007" stays "007")."""
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        try:
            table = pq.read_table(path)
        except pa.ArrowInvalid as exc:
            raise ContractError(
                f"not a readable Parquet file: {_first_line(exc)}", location=path.name
            ) from None
    else:
        separator = next(
            (sep for suffix, sep in _CSV_SEPARATORS.items() if lower.endswith(suffix)), None
        )
        if separator is None:
            raise ContractError(
                "unsupported file type; use .csv, .csv.gz, .tsv or .parquet", location=path.name
            )
        table = _read_csv(path, separator)
    if table.num_rows == 0:
        raise ContractError("the file has a header but no rows", location=path.name)
    return table.to_pandas()


def dataset_from_frames(
    events: pd.DataFrame,
    users: pd.DataFrame | None = None,
    items: pd.DataFrame | None = None,
    *,
    name: str,
    labels: Mapping[str, str] | None = None,
) -> Dataset:
    """Validate in-memory tables under the same rules as files (the loaders of public data sets
    build frames and come through here).

    Args:
        events: Raw events; extra columns are ignored.
        users: Raw users, or None to derive one row per user from the events.
        items: Raw items, or None to derive them from the events.
        name: The data set's name.
        labels: How messages name each table (``events``, ``users``, ``items``), usually file
            names.

    Raises:
        ContractError: One line naming table, row and field of the first bad value.
    """
    label = {table: table for table in TABLES} | dict(labels or {})
    warnings: list[str] = []
    event_frame, user_codes, item_codes = _normalise_events(label["events"], events)

    if users is None:
        user_frame = pd.DataFrame(
            {"user_id": pd.Series(user_codes.dictionary.sort().to_pylist(), dtype="str")}
        )
    else:
        user_frame = _normalise_users(label["users"], users)
        _check_events_have_users(label, event_frame, user_codes, user_frame)

    known_items = None if items is None else _normalise_items(label["items"], items)
    item_frame = _complete_items(label["items"], known_items, item_codes.dictionary, warnings)

    event_frame, repeated = _sorted_unique_events(event_frame, user_codes, item_codes)
    if repeated:
        warnings.append(f"{repeated} exact duplicate event rows in {label['events']} were dropped")
    return Dataset(event_frame, user_frame, item_frame, name, warnings)


def write_tables(dataset: Dataset, folder: Path, fmt: Literal["csv", "parquet"]) -> dict[str, Path]:
    """Write the three tables in the contract's file format, so :func:`load_tables` reads them
    back unchanged (CSV cannot carry types: a categorical profile column whose values are all
    digits comes back numeric).

    Returns:
        The written file for each of ``events``, ``users`` and ``items``.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"unknown format {fmt!r}; use 'csv' or 'parquet'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = dataset.items
    vectors = list(items["vector"])
    attributes = {
        name: pa.array(items[name].to_numpy(np.float64), pa.float64(), from_pandas=True)
        for name in dataset.item_attributes()
    }
    if fmt == "csv":
        item_table = pa.table(
            {
                "item_id": pa.array(items["item_id"], pa.string()),
                "categories": pa.array(
                    [CATEGORY_SEPARATOR.join(names) or None for names in items["categories"]],
                    pa.string(),
                ),
                "vector": pa.array(_vectors_as_text(vectors), pa.string()),
                **attributes,
            }
        )
    else:
        item_table = pa.table(
            {
                "item_id": pa.array(items["item_id"], pa.string()),
                "categories": pa.array(
                    [list(names) for names in items["categories"]], pa.list_(pa.string())
                ),
                "vector": pa.array(
                    [None if v is None else np.asarray(v, np.float32) for v in vectors],
                    pa.list_(pa.float32()),
                ),
                **attributes,
            }
        )
    tables = {
        "events": pa.Table.from_pandas(dataset.events, preserve_index=False),
        "users": pa.Table.from_pandas(dataset.users, preserve_index=False),
        "items": item_table,
    }
    paths: dict[str, Path] = {}
    for table_name, table in tables.items():
        paths[table_name] = folder / f"{table_name}.{fmt}"
        if fmt == "csv":
            pacsv.write_csv(table, paths[table_name])
        else:
            pq.write_table(table, paths[table_name])
    return paths


# -- reading ---------------------------------------------------------------------------------


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith(tuple(_CSV_SEPARATORS))


def _read_csv(path: Path, separator: str) -> pa.Table:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=separator), None)
    if not header:
        raise ContractError("the file is empty (no header row)", location=path.name)
    convert = pacsv.ConvertOptions(
        column_types={column: pa.string() for column in header},
        strings_can_be_null=True,
        null_values=[""],  # "NA" or "null" may be real ids or labels
    )
    try:
        return pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(delimiter=separator), convert_options=convert
        )
    except pa.ArrowInvalid as exc:
        raise ContractError(_first_line(exc), location=path.name) from None


def _infer_numeric_profile(frame: pd.DataFrame) -> pd.DataFrame:
    """Turn CSV profile columns whose every non-empty value is a number into float64."""
    frame = frame.copy()
    for column in frame.columns:
        if column == "user_id":
            continue
        numbers = _float_column(frame[column])
        if bool((~np.isnan(numbers) | _blank(frame[column])).all()):
            frame[column] = numbers
    return frame


def _arrow(values: pd.Series) -> pa.Array:
    """A column as one contiguous Arrow array (pandas may hold it in several chunks)."""
    array = pa.array(values)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _dictionary_encode(
    values: pd.Series, null_encoding: Literal["mask", "encode"] = "mask"
) -> pa.DictionaryArray:
    """A column as Arrow dictionary codes into its distinct values."""
    encoded = pc.dictionary_encode(_arrow(values), null_encoding=null_encoding)
    # The pyarrow stubs type the result as the argument's type; it is a DictionaryArray.
    return cast(pa.DictionaryArray, encoded)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- column rules ----------------------------------------------------------------------------


def _settle(
    label: str,
    series: pd.Series,
    rejected: np.ndarray,
    parse: Callable[[Any], Any],
    out: np.ndarray,
) -> None:
    """Run the contract's scalar rule on the rows a column check refused, in row order: it either
    accepts the value (written to ``out``) or raises, and the error gets the row number."""
    for position in np.flatnonzero(rejected):
        raw = _scalar(series.iloc[position])
        try:
            out[position] = parse(raw)
        except ContractError as exc:
            raise ContractError(
                exc.reason, field=exc.field, location=f"{label}: row {position + 1}"
            ) from None


def _scalar(value: Any) -> Any:
    """A cell as the plain Python value the contract functions expect (missing as None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(
        series.dtype
    )


def _as_text(series: pd.Series) -> pd.Series:
    """The column as Arrow-backed strings with missing values kept missing."""
    if series.dtype == "str":
        return series
    if pd.api.types.is_float_dtype(series.dtype):
        series = series.where(~series.isna(), None)
    return series.astype("str")


def id_column(series: pd.Series, field_name: str, label: str) -> pd.Series:
    """A column of ids as strings under the contract's id rule (whole numbers from typed files
    become their digits).

    Raises:
        ContractError: naming ``label``, the row and ``field_name`` of the first bad id.
    """
    series = series.reset_index(drop=True)
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(np.float64, na_value=np.nan, copy=True)
        integral = np.isfinite(values) & (values == np.round(values))
        text = pd.Series(np.where(integral, values, 0).astype(np.int64)).astype("str")
        text = text.where(integral)
    elif pd.api.types.is_integer_dtype(series.dtype):
        text = series.astype("str")
    elif isinstance(series.dtype, pd.StringDtype):
        text = series if series.dtype == "str" else series.astype("str")
    else:  # object or bool: only real strings take the column path
        text = series.where(series.map(type).eq(str)).astype("str")
    matches = pc.match_substring_regex(pa.array(text), ID_PATTERN.pattern)
    rejected = ~matches.fill_null(False).to_numpy(zero_copy_only=False)
    if not rejected.any():
        return text
    out = text.to_numpy(dtype=object, na_value=None)
    _settle(label, series, rejected, lambda raw: check_id(raw, field_name), out)
    return pd.Series(out, dtype="str")


def _float_column(series: pd.Series) -> np.ndarray:
    """Numbers of a column, NaN where missing or not plainly a number (the contract's scalar
    rule then decides about spellings such as "nan" or "1_000")."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return np.full(len(series), np.nan)
    if _is_number(series):
        return series.to_numpy(np.float64, na_value=np.nan, copy=True)
    text = pa.array(_as_text(series))
    try:
        numbers = pc.cast(text, pa.float64())
    except pa.ArrowInvalid:  # some value is not a plain number: cast only those that are
        text = pc.utf8_trim_whitespace(text)
        plain = pc.match_substring_regex(text, _PLAIN_NUMBER).fill_null(False)
        numbers = pc.cast(pc.if_else(plain, text, None), pa.float64())
    return numbers.to_numpy(zero_copy_only=False).astype(np.float64, copy=True)


def _timestamp_column(label: str, series: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        moments = series if series.dt.tz is not None else series.dt.tz_localize("UTC")
        seconds = (
            (moments - _EPOCH).dt.total_seconds().to_numpy(np.float64, na_value=np.nan, copy=True)
        )
    else:
        seconds = _float_column(series)
        if not _is_number(series):
            text = _as_text(series)
            iso = np.isnan(seconds) & text.notna().to_numpy()
            if iso.any():
                moments = pd.to_datetime(text[iso], utc=True, format="ISO8601", errors="coerce")
                seconds[iso] = (
                    (moments - _EPOCH)
                    .dt.total_seconds()
                    .to_numpy(np.float64, na_value=np.nan, copy=True)
                )
    with np.errstate(invalid="ignore"):
        rejected = ~((seconds >= MIN_TIMESTAMP) & (seconds < MAX_TIMESTAMP))
    _settle(label, series, rejected, parse_timestamp, seconds)
    return seconds


def _weight_column(label: str, series: pd.Series | None, rows: int) -> np.ndarray:
    if series is None:
        return np.ones(rows)
    weights = _float_column(series)
    weights[_blank(series)] = 1.0
    with np.errstate(invalid="ignore"):
        rejected = ~((weights >= 0.0) & (weights <= MAX_WEIGHT))
    _settle(label, series, rejected, parse_weight, weights)
    return weights


def _blank(series: pd.Series) -> np.ndarray:
    """Rows the contract reads as "not given": missing, NaN, or only whitespace."""
    if _is_number(series) or pd.api.types.is_bool_dtype(series.dtype):
        return series.isna().to_numpy()
    text = _as_text(series).str.strip()
    return (text.isna() | (text.str.len() == 0)).to_numpy(bool)


def _text_column(
    label: str, series: pd.Series | None, field_name: str, rows: int, default: str | None
) -> pd.Series:
    """Stripped short labels as Arrow strings; missing or empty become ``default``."""
    if series is None:
        return pd.Series([default] * rows, dtype="str")
    text = _as_text(series).str.strip()
    lengths = text.str.len()
    too_long = (lengths > MAX_TEXT_LENGTH).fillna(False).to_numpy(bool)
    _settle(
        label, series, too_long, lambda raw: parse_text(raw, field_name), np.empty(rows, object)
    )
    blank = (text.isna() | (lengths == 0)).to_numpy(bool)
    text = text.reset_index(drop=True)
    if default is not None:
        return text.where(~blank, default)
    return text.where(~blank)


def _as_object(text: pd.Series) -> pd.Series:
    """Strings as an object column with None for missing, the contract's optional-text shape.

    Labels repeat, so each distinct one becomes one Python string shared by its rows, which is
    faster and smaller than a string object per row.
    """
    encoded = _dictionary_encode(text, null_encoding="encode")
    labels = np.asarray(encoded.dictionary.to_pylist() + [None], dtype=object)
    return pd.Series(labels[encoded.indices.to_numpy(zero_copy_only=False)], dtype=object)


def _profile_column(label: str, series: pd.Series, column: str) -> pd.Series:
    if _is_number(series):
        values = series.to_numpy(np.float64, na_value=np.nan, copy=True)
        _settle(
            label, series, np.isinf(values), lambda raw: parse_profile_value(raw, column), values
        )
        return pd.Series(values)
    if pd.api.types.is_bool_dtype(series.dtype):
        series = series.map({True: "true", False: "false"})
    return _as_object(_text_column(label, series, column, len(series), None))


def _categories_column(label: str, series: pd.Series | None, rows: int) -> np.ndarray:
    """Category tuples; each distinct spelling is parsed once, since catalogues repeat them."""
    out = np.empty(rows, dtype=object)
    if series is None:
        out[:] = [()] * rows
        return out
    parsed: dict[Any, tuple[str, ...]] = {}
    for position, raw in enumerate(series.to_numpy(dtype=object)):
        value = raw if isinstance(raw, str) else _scalar(raw) if np.ndim(raw) == 0 else tuple(raw)
        if value not in parsed:
            try:
                parsed[value] = parse_categories(list(value) if isinstance(value, tuple) else value)
            except ContractError as exc:
                raise ContractError(
                    exc.reason, field=exc.field, location=f"{label}: row {position + 1}"
                ) from None
        out[position] = parsed[value]
    return out


def _vector_column(label: str, series: pd.Series | None, rows: int) -> np.ndarray:
    """Content vectors as float32 arrays (None where absent), all of one length."""
    out = np.full(rows, None, dtype=object)
    if series is None:
        return out
    if isinstance(series.dtype, pd.StringDtype):
        lengths = series.str.split().str.len().fillna(0).to_numpy(np.int64)
        arrays = None
    else:
        arrays = [
            None
            if np.ndim(v) == 0 and _scalar(v) is None
            else np.asarray(v.split() if isinstance(v, str) else v).ravel()
            for v in series.to_numpy(dtype=object)
        ]
        lengths = np.array([0 if a is None else a.size for a in arrays], dtype=np.int64)
    present = np.flatnonzero(lengths > 0)
    if present.size == 0:
        return out
    width = lengths[present[0]]
    ragged = present[lengths[present] != width]
    if ragged.size:
        row = int(ragged[0])
        raise ContractError(
            f"has {lengths[row]} values but the vector of row "
            f"{present[0] + 1} has {width}; all vectors need one length",
            field="vector",
            location=f"{label}: row {row + 1}",
        )
    try:
        if arrays is None:
            lines = io.StringIO("\n".join(series.iloc[present]))
            matrix = np.loadtxt(lines, dtype=np.float64, ndmin=2, comments=None)
        else:
            # Every row in ``present`` has a vector (its length is above 0).
            matrix = np.stack([cast(np.ndarray, arrays[p]) for p in present]).astype(np.float64)
        usable = bool(np.isfinite(_float32(matrix)).all())
    except ValueError:
        usable = False
    if not usable:  # find the row to blame, or accept spellings only float() reads
        matrix = np.stack([_vector_values(label, p, series.iloc[p]) for p in present])
    for position, vector in zip(present, _float32(matrix), strict=True):
        out[position] = vector
    return out


def _float32(values: npt.ArrayLike) -> np.ndarray:
    """Values as float32; those beyond its range become inf, which the callers refuse."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(np.float32)


def _vector_values(label: str, position: int | np.integer[Any], raw: Any) -> np.ndarray:
    """One row's vector, or the error that names its first unusable value."""
    tokens = raw.split() if isinstance(raw, str) else np.asarray(raw).ravel()
    values = np.empty(len(tokens))
    for index, token in enumerate(tokens):
        try:
            number = float(token)
        except (TypeError, ValueError):
            reason = f"{str(token)[:40]!r} is not a number"
        else:
            values[index] = number
            if np.isfinite(_float32(np.float64(number))):
                continue
            reason = f"{number!r} is not a finite float32"
        raise ContractError(reason, field="vector", location=f"{label}: row {position + 1}")
    return values


# -- tables ----------------------------------------------------------------------------------


def _require(label: str, frame: pd.DataFrame, required: tuple[str, ...]) -> pd.DataFrame:
    for column in required:
        if column not in frame.columns:
            found = ", ".join(map(str, frame.columns)) or "none"
            raise ContractError(
                f"required column is missing (columns found: {found})", field=column, location=label
            )
    if len(frame) == 0:
        raise ContractError("the table has no rows", location=label)
    return frame.reset_index(drop=True)


def _normalise_events(
    label: str, raw: pd.DataFrame
) -> tuple[pd.DataFrame, pa.DictionaryArray, pa.DictionaryArray]:
    """Validated events in input order (``context`` still as Arrow strings), plus the
    dictionary-encoded user and item ids that the later checks, the deduplication and the sort
    reuse."""
    raw = _require(label, raw, EVENT_REQUIRED_COLUMNS)
    rows = len(raw)
    user_ids = id_column(raw["user_id"], "user_id", label)
    item_ids = id_column(raw["item_id"], "item_id", label)
    frame = pd.DataFrame(
        {
            "user_id": user_ids,
            "item_id": item_ids,
            "timestamp": _timestamp_column(label, raw["timestamp"]),
            "event_type": _text_column(
                label, raw.get("event_type"), "event_type", rows, DEFAULT_EVENT_TYPE
            ),
            "weight": _weight_column(label, raw.get("weight"), rows),
            "context": _text_column(label, raw.get("context"), "context", rows, None),
        }
    )
    return frame, _dictionary_encode(user_ids), _dictionary_encode(item_ids)


def _normalise_users(label: str, raw: pd.DataFrame) -> pd.DataFrame:
    raw = _require(label, raw, USER_REQUIRED_COLUMNS)
    profile = [column for column in raw.columns if column != "user_id"]
    if len(profile) > MAX_PROFILE_FIELDS:
        raise ContractError(
            f"{len(profile)} profile columns; at most {MAX_PROFILE_FIELDS}",
            field="profile",
            location=label,
        )
    columns = {"user_id": id_column(raw["user_id"], "user_id", label)}
    _refuse_duplicates(label, columns["user_id"], "user_id", "user")
    for column in profile:
        name = parse_text(column, "profile")
        if name is None or name in columns:
            raise ContractError(
                f"profile column name {column!r} is empty or repeated",
                field="profile",
                location=label,
            )
        columns[name] = _profile_column(label, raw[column], name)
    return pd.DataFrame(columns)


def _normalise_items(label: str, raw: pd.DataFrame) -> pd.DataFrame:
    raw = _require(label, raw, ITEM_REQUIRED_COLUMNS)
    rows = len(raw)
    item_ids = id_column(raw["item_id"], "item_id", label)
    _refuse_duplicates(label, item_ids, "item_id", "item")
    frame = pd.DataFrame(
        {
            "item_id": item_ids,
            "categories": _categories_column(label, raw.get("categories"), rows),
            "vector": _vector_column(label, raw.get("vector"), rows),
        }
    )
    attributes = _item_attributes(label, raw)
    if len(attributes) > MAX_ITEM_ATTRIBUTES:
        raise ContractError(
            f"{len(attributes)} numeric item attribute columns; at most {MAX_ITEM_ATTRIBUTES}",
            field="items",
            location=label,
        )
    for name, values in attributes.items():
        frame[name] = values
    return frame


def _item_attributes(label: str, raw: pd.DataFrame) -> dict[str, np.ndarray]:
    """The items table's numeric extra columns as float64 (NaN where not given).

    A column is numeric when its type is (Parquet) or when every non-empty value is a plain
    number (CSV, read as text); other extra columns, such as a title, are ignored. An infinite
    value is refused, naming the column and the row.
    """
    out: dict[str, np.ndarray] = {}
    for column in raw.columns:
        if column in ITEM_COLUMNS or pd.api.types.is_bool_dtype(raw[column].dtype):
            continue
        series = raw[column]
        values = _float_column(series)
        blank = _blank(series)
        if not _is_number(series) and (blank.all() or not (~np.isnan(values) | blank).all()):
            continue
        infinite = np.flatnonzero(np.isinf(values))
        if infinite.size:
            row = int(infinite[0])
            raise ContractError(
                f"{float(values[row])!r} is not a finite number",
                field=str(column),
                location=f"{label}: row {row + 1}",
            )
        name = parse_text(column, "items")
        if name is None:
            raise ContractError("a numeric item column has no name", field="items", location=label)
        out[name] = values
    return out


def _refuse_duplicates(label: str, ids: pd.Series, field_name: str, noun: str) -> None:
    repeated = ids.duplicated().to_numpy()
    if repeated.any():
        position = int(np.argmax(repeated))
        first = int(np.argmax((ids == ids.iloc[position]).to_numpy()))
        raise ContractError(
            f"duplicate {noun} id {ids.iloc[position]!r} (first at row {first + 1})",
            field=field_name,
            location=f"{label}: row {position + 1}",
        )


def _check_events_have_users(
    label: Mapping[str, str],
    events: pd.DataFrame,
    user_codes: pa.DictionaryArray,
    users: pd.DataFrame,
) -> None:
    known = pc.is_in(user_codes.dictionary, value_set=_arrow(users["user_id"]))
    unknown = ~known.to_numpy(zero_copy_only=False)
    if unknown.any():
        rows = np.flatnonzero(unknown[user_codes.indices.to_numpy()])
        user = events["user_id"].iloc[rows[0]]
        raise ContractError(
            f"user {user!r} is not in {label['users']}",
            field="user_id",
            location=f"{label['events']}: row {rows[0] + 1}",
        )


def _complete_items(
    label: str, known: pd.DataFrame | None, referenced: pa.Array, warnings: list[str]
) -> pd.DataFrame:
    """The items table plus every item the events use that it lacks."""
    if known is None:
        missing = referenced.sort()
        known = pd.DataFrame(
            {
                "item_id": pd.Series([], dtype="str"),
                "categories": np.empty(0, object),
                "vector": np.empty(0, object),
            }
        )
    else:
        absent = ~pc.is_in(referenced, value_set=_arrow(known["item_id"])).to_numpy(
            zero_copy_only=False
        )
        missing = referenced.filter(pa.array(absent)).sort()
        if len(missing):
            warnings.append(
                f"{len(missing)} items referenced by events are not in {label}; "
                "they get no categories"
            )
    if not len(missing):
        return known
    added = pd.DataFrame(
        {
            "item_id": pd.Series(missing.to_pylist(), dtype="str"),
            "categories": pd.Series([()] * len(missing), dtype=object),
            "vector": pd.Series([None] * len(missing), dtype=object),
        }
    )
    return pd.concat([known, added], ignore_index=True)


def _codes(values: pd.Series) -> np.ndarray:
    encoded = _dictionary_encode(values, null_encoding="encode")
    return encoded.indices.to_numpy(zero_copy_only=False)


def _sorted_unique_events(
    events: pd.DataFrame, user_codes: pa.DictionaryArray, item_codes: pa.DictionaryArray
) -> tuple[pd.DataFrame, int]:
    """The events stably sorted by (user_id, timestamp), without exact duplicates (the copy
    earliest in the input stays), with ``context`` as objects; plus the number dropped.

    Sorting and dropping are one row selection, skipped when the rows are already in order and
    unique, as files written by :func:`write_tables` are.
    """
    users = user_codes.dictionary
    rank = np.empty(len(users), np.int64)
    rank[pc.sort_indices(users).to_numpy()] = np.arange(len(users))
    user_rank = rank[user_codes.indices.to_numpy(zero_copy_only=False)]
    item_code = item_codes.indices.to_numpy(zero_copy_only=False)
    timestamps = events["timestamp"].to_numpy()
    rows = np.arange(len(events))
    step = np.diff(user_rank)
    if not np.all((step > 0) | ((step == 0) & (np.diff(timestamps) >= 0))):
        rows = pc.sort_indices(
            pa.table({"user": user_rank, "timestamp": timestamps}),
            sort_keys=[("user", "ascending"), ("timestamp", "ascending")],
        ).to_numpy()
    repeated = _repeated_rows(events, rows, user_rank[rows], item_code[rows], timestamps[rows])
    if repeated.any() or not np.array_equal(rows, np.arange(len(events))):
        events = events.take(rows[~repeated]).reset_index(drop=True)
    events["context"] = _as_object(events["context"])
    return events, int(repeated.sum())


def _repeated_rows(
    events: pd.DataFrame,
    rows: np.ndarray,
    user_rank: np.ndarray,
    item_code: np.ndarray,
    timestamps: np.ndarray,
) -> np.ndarray:
    """Which of the events taken in ``rows`` order (sorted) repeat an earlier one exactly.

    Copies share user and time, so after the stable sort they sit in one run of equal
    (user, timestamp), in input order; only rows in such runs are compared, first by a hash of
    integer codes (hashing strings in pandas is slow) and then exactly where hashes collide.
    """
    tied = (np.diff(user_rank) == 0) & (np.diff(timestamps) == 0)
    in_run = np.zeros(len(rows), bool)
    in_run[1:] |= tied
    in_run[:-1] |= tied
    candidates = np.flatnonzero(in_run)
    repeated = np.zeros(len(rows), bool)
    if candidates.size == 0:
        return repeated
    subset = events.iloc[rows[candidates]]
    keys = pd.DataFrame(
        {
            "user": user_rank[candidates],
            "item": item_code[candidates],
            "timestamp": timestamps[candidates],
            "event_type": _codes(subset["event_type"]),
            "weight": subset["weight"].to_numpy(),
            "context": _codes(subset["context"]),
        }
    )
    hashes = pd.util.hash_pandas_object(keys, index=False)
    suspects = np.flatnonzero(hashes.duplicated(keep=False).to_numpy())
    repeated[candidates[suspects]] = keys.iloc[suspects].duplicated().to_numpy()
    return repeated


def _vectors_as_text(vectors: list[Any]) -> list[str | None]:
    """Space-separated floats with nine significant digits, enough to restore float32 exactly."""
    present = [position for position, vector in enumerate(vectors) if vector is not None]
    out: list[str | None] = [None] * len(vectors)
    if present:
        matrix = np.stack([np.asarray(vectors[p], np.float32) for p in present])
        cells = np.char.mod("%.9g", matrix)
        for position, row in zip(present, cells, strict=True):
            out[position] = " ".join(row)
    return out
