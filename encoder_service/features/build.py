"""Offline: fit a schema and build every user's feature state from whole tables at once.

This is the batch twin of ``FeatureState.apply``: the same decayed sums, computed with sparse
matrix products instead of an event loop, so that a million users build in seconds. The test
suite replays histories through ``apply`` and checks both agree. Uses pandas and scipy, so it is
imported by the training job only, never by the serving side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from encoder_service.data.tables import Dataset
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.popularity import popularity_coordinates
from encoder_service.features.schema import (
    HALF_LIVES_DAYS,
    HEATMAP_CELLS,
    RHYTHM_HALF_LIFE_DAYS,
    UNKNOWN,
    FeatureSchema,
    ProfileField,
)
from encoder_service.features.state import SECONDS_PER_DAY, FeatureState

MAX_CATEGORIES = 128
MAX_LABELS = 32
MAX_PROFILE_VALUES = 64
MIN_PROFILE_VALUE_COUNT = 2


def fit_schema(
    dataset: Dataset,
    *,
    item_vector_dim: int,
    popularity_bins: int = 0,
    exclude_profile: Sequence[str] = (),
) -> FeatureSchema:
    """Vocabularies and profile statistics from the training data.

    Rare values beyond the caps share the ``__other__`` slot, so a long tail (zip codes, a
    catalogue with thousands of categories) cannot blow up the input width.
    """
    category_counts = (
        dataset.items["categories"].explode().dropna().value_counts()
        if len(dataset.items)
        else pd.Series(dtype=int)
    )
    categories = tuple(str(c) for c in category_counts.index[:MAX_CATEGORIES])
    event_types = _top_labels(dataset.events["event_type"], MAX_LABELS)
    contexts = _top_labels(dataset.events["context"], MAX_LABELS)
    fields: list[ProfileField] = []
    for name in dataset.profile_fields():
        if name in exclude_profile:
            continue
        column = dataset.users[name]
        if pd.api.types.is_numeric_dtype(column):
            values = column.astype(float).dropna()
            mean = float(values.mean()) if len(values) else 0.0
            std = float(values.std()) if len(values) > 1 else 1.0
            fields.append(ProfileField(name, True, mean=mean, std=std if std > 1e-9 else 1.0))
        else:
            counts = column.dropna().astype(str).value_counts()
            counts = counts[counts >= MIN_PROFILE_VALUE_COUNT]
            vocabulary = tuple(str(v) for v in counts.index[:MAX_PROFILE_VALUES])
            fields.append(ProfileField(name, False, vocabulary=vocabulary))
    return FeatureSchema(
        categories=categories,
        event_types=event_types,
        contexts=contexts,
        profile_fields=tuple(fields),
        item_vector_dim=item_vector_dim,
        item_attributes=tuple(dataset.item_attributes()),
        popularity_bins=popularity_bins,
    )


def _top_labels(column: pd.Series, cap: int) -> tuple[str, ...]:
    counts = column.dropna().astype(str).value_counts()
    return tuple(str(v) for v in counts.index[:cap])


def build_catalog(dataset: Dataset, vectors: np.ndarray, popularity_bins: int = 0) -> ItemCatalog:
    """The version's catalogue: ``vectors`` rows follow ``dataset.items`` order.

    Every vector is extended by the item's attributes (``dataset.item_attributes()``, each
    standardised over the items that have it; a missing value is the mean, 0) and, with
    ``popularity_bins`` > 0, by its popularity coordinates over ``dataset.events``
    (``features.popularity``).
    """
    item_ids = dataset.items["item_id"].astype(str)
    vectors = np.hstack([np.asarray(vectors, dtype=np.float32), _attributes(dataset)])
    cold: tuple[float, ...] = ()
    if popularity_bins > 0:
        counts = dataset.events["item_id"].astype(str).value_counts()
        per_item = counts.reindex(item_ids, fill_value=0).to_numpy(np.float64)
        coordinates, cold_row = popularity_coordinates(per_item, popularity_bins)
        vectors = np.hstack([vectors, coordinates])
        cold = tuple(cold_row.tolist())
    return ItemCatalog(
        item_ids=tuple(item_ids),
        categories=tuple(tuple(c) for c in dataset.items["categories"]),
        vectors=vectors,
        cold_popularity=cold,
    )


def _attributes(dataset: Dataset) -> np.ndarray:
    """Standardised item attribute columns ``[n_items, n_attributes]`` float32, 0 if missing."""
    names = dataset.item_attributes()
    out = np.zeros((len(dataset.items), len(names)), dtype=np.float32)
    for k, name in enumerate(names):
        values = dataset.items[name].to_numpy(np.float64)
        given = ~np.isnan(values)
        if not given.any():
            continue
        mean, std = values[given].mean(), values[given].std()
        out[given, k] = (values[given] - mean) / (std if std > 1e-9 else 1.0)
    return out


def build_states(
    dataset: Dataset, catalogs: dict[str, ItemCatalog]
) -> tuple[list[str], list[FeatureState]]:
    """Every user's state, in ``dataset.users`` order (users without events get empty states).

    Args:
        dataset: validated tables; every event's item is in ``dataset.items``.
        catalogs: catalogue hash -> catalogue; each gets its own item-vector sums.
    """
    users = dataset.users["user_id"].astype(str).to_numpy()
    user_index = pd.Index(users)
    events = dataset.events
    n_users = len(users)
    u = user_index.get_indexer(events["user_id"].astype(str))
    if (u < 0).any():
        raise ValueError("events reference users missing from the users table")
    t = events["timestamp"].to_numpy(np.float64)
    w = events["weight"].to_numpy(np.float64)

    t_last = np.full(n_users, -np.inf)
    np.maximum.at(t_last, u, t)
    t_first = np.full(n_users, np.inf)
    np.minimum.at(t_first, u, t)
    age_days = (t_last[u] - t) / SECONDS_PER_DAY
    decay = np.exp2(-age_days[:, None] / np.asarray(HALF_LIVES_DAYS)[None, :])  # [E, H]
    rhythm_w = w * np.exp2(-age_days / RHYTHM_HALF_LIFE_DAYS)

    count = np.bincount(u, minlength=n_users)
    weight_sum = np.bincount(u, weights=w, minlength=n_users)
    weight_sq = np.bincount(u, weights=w * w, minlength=n_users)
    mass = np.stack(
        [np.bincount(u, weights=w * decay[:, h], minlength=n_users) for h in range(decay.shape[1])],
        axis=1,
    )
    day = np.floor_divide(t, SECONDS_PER_DAY).astype(np.int64)
    cell = ((day + 3) % 7) * 24 + ((t % SECONDS_PER_DAY) // 3600).astype(np.int64)
    heatmap = np.bincount(
        u * HEATMAP_CELLS + cell, weights=rhythm_w, minlength=n_users * HEATMAP_CELLS
    ).reshape(n_users, HEATMAP_CELLS)

    item_index = pd.Index(dataset.items["item_id"].astype(str))
    i = item_index.get_indexer(events["item_id"].astype(str))
    cat_names, item_cat = _item_category_matrix(dataset.items["categories"])
    per_horizon = [
        sp.csr_matrix((w * decay[:, h], (u, i)), shape=(n_users, len(item_index)))
        for h in range(decay.shape[1])
    ]
    cat_sums = sp.hstack([m @ item_cat for m in per_horizon]).tocsr()
    item_sums = {
        cid: np.stack([m @ _aligned_vectors(catalog, item_index) for m in per_horizon], axis=1)
        for cid, catalog in catalogs.items()
    }
    event_types = _label_sums(u, events["event_type"], rhythm_w, n_users)
    contexts = _label_sums(u, events["context"].fillna(UNKNOWN), rhythm_w, n_users)
    profiles = _profiles(dataset)

    states: list[FeatureState] = []
    for row in range(n_users):
        state = FeatureState(profile=profiles[row])
        if count[row]:
            state.t_first = float(t_first[row])
            state.t_last = float(t_last[row])
            state.count = int(count[row])
            state.weight_sum = float(weight_sum[row])
            state.weight_sq_sum = float(weight_sq[row])
            state.mass = mass[row].copy()
            state.heatmap = heatmap[row].copy()
            state.categories = _row_categories(cat_sums, row, cat_names, len(per_horizon))
            state.item_sums = {cid: sums[row].copy() for cid, sums in item_sums.items()}
            state.event_types = event_types[row]
            state.contexts = contexts[row]
        states.append(state)
    return [str(x) for x in users], states


def _item_category_matrix(categories: pd.Series) -> tuple[list[str], sp.csr_matrix]:
    """Items x category names, each item's row summing to 1 (or 0 without categories)."""
    names: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for row, cats in enumerate(categories):
        for name in cats:
            rows.append(row)
            cols.append(names.setdefault(str(name), len(names)))
            vals.append(1.0 / len(cats))
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(len(categories), max(len(names), 1)))
    return list(names), matrix


def _aligned_vectors(catalog: ItemCatalog, item_index: pd.Index) -> np.ndarray:
    """Catalogue vectors in ``item_index`` order, with the catalogue's fallback for strangers."""
    rows = catalog.vectors.astype(np.float64)
    out = np.empty((len(item_index), catalog.dim))
    positions = pd.Index(catalog.item_ids).get_indexer(item_index)
    known = positions >= 0
    out[known] = rows[positions[known]]
    out[~known] = catalog.mean_vector
    return out


def _row_categories(
    combined: sp.csr_matrix, row: int, names: list[str], horizons: int
) -> dict[str, np.ndarray]:
    """One user's category sums from the horizon-stacked matrix (columns ``h * C + c``)."""
    start, end = combined.indptr[row], combined.indptr[row + 1]
    out: dict[str, np.ndarray] = {}
    width = len(names)
    for col, value in zip(combined.indices[start:end], combined.data[start:end], strict=True):
        h, c = divmod(int(col), width)
        held = out.get(names[c])
        if held is None:
            held = out[names[c]] = np.zeros(horizons)
        held[h] = value
    return out


def _label_sums(
    u: np.ndarray, labels: pd.Series, weights: np.ndarray, n_users: int
) -> list[dict[str, float]]:
    codes, uniques = pd.factorize(labels.astype(str))
    matrix = sp.csr_matrix((weights, (u, codes)), shape=(n_users, max(len(uniques), 1)))
    out: list[dict[str, float]] = []
    for row in range(n_users):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        out.append(
            {
                str(uniques[c]): float(v)
                for c, v in zip(matrix.indices[start:end], matrix.data[start:end], strict=True)
            }
        )
    return out


def _profiles(dataset: Dataset) -> list[dict[str, str | float | None]]:
    fields = dataset.profile_fields()
    if not fields:
        return [{} for _ in range(len(dataset.users))]
    frame = dataset.users[fields].astype(object).where(dataset.users[fields].notna(), None)
    return frame.to_dict(orient="records")  # type: ignore[return-value]
