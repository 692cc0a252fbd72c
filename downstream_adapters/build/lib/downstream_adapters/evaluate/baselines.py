"""Per-task feature pipelines the shared embedding is compared against, built from raw events.

* ``raw items``: the binary watched vector over all items, rows L2-normalised.
* ``svd-64``: a 64-dim truncated SVD of that interaction matrix.
* ``aggregates``: hand-curated features: genre shares, mean and spread of ratings, activity
  (log count, log active days), and a day-of-week x hour-of-day heatmap (UTC).
* ``random``: a 64-dim Gaussian vector per user; the control any representation must beat.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.preprocessing import normalize

from downstream_adapters.evaluate.data import Tables


def interaction_matrix(tables: Tables, user_ids: list[str]) -> sparse.csr_matrix:
    events = tables.events
    rows = pd.Index(user_ids).get_indexer(events["user_id"])
    items = pd.Index(sorted(events["item_id"].unique()))
    cols = items.get_indexer(events["item_id"])
    keep = rows >= 0
    data = np.ones(int(keep.sum()), dtype=np.float32)
    matrix = sparse.csr_matrix((data, (rows[keep], cols[keep])), shape=(len(user_ids), len(items)))
    matrix.data[:] = 1.0  # repeated interactions still mean "watched"
    return matrix


def raw_items(tables: Tables, user_ids: list[str]) -> sparse.csr_matrix:
    return normalize(interaction_matrix(tables, user_ids), norm="l2")


def svd(tables: Tables, user_ids: list[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    matrix = interaction_matrix(tables, user_ids)
    dim = min(dim, min(matrix.shape) - 1)
    return TruncatedSVD(dim, random_state=seed).fit_transform(matrix).astype(np.float32)


def aggregates(tables: Tables, user_ids: list[str]) -> np.ndarray:
    events = tables.events
    grouped = events.groupby("user_id")
    stats = pd.DataFrame(
        {
            "mean_rating": grouped["weight"].mean(),
            "std_rating": grouped["weight"].std().fillna(0.0),
            "log_count": np.log1p(grouped.size()),
            "log_days": np.log1p(
                (grouped["timestamp"].max() - grouped["timestamp"].min()) / 86400.0
            ),
        }
    ).reindex(user_ids)
    times = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    slot = (times.dt.dayofweek * 24 + times.dt.hour).to_numpy()
    heat = pd.crosstab(events["user_id"], slot).reindex(index=user_ids, columns=range(168))
    heat = heat.fillna(0.0)
    heat = heat.div(heat.sum(axis=1).replace(0, 1), axis=0)
    parts = [stats.fillna(0.0).to_numpy(), heat.to_numpy()]
    if tables.item_categories:
        names = sorted({c for cats in tables.item_categories.values() for c in cats})
        exploded = (
            events[["user_id", "item_id"]]
            .assign(category=events["item_id"].map(tables.item_categories))
            .explode("category")
            .dropna()
        )
        shares = pd.crosstab(exploded["user_id"], exploded["category"], normalize="index")
        parts.append(shares.reindex(index=user_ids, columns=names).fillna(0.0).to_numpy())
    return np.hstack(parts).astype(np.float32)


def random_control(user_ids: list[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(user_ids), dim)).astype(np.float32)
