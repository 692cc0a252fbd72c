"""Item popularity coordinates, appended to every item vector of a catalogue.

Real users pick popular items far more often than a uniform draw from the catalogue would:
item popularity is skewed in every interaction data set, and how mainstream a user's choices
are is a profile trait of its own. Item vectors (PPMI-SVD, unit norm; or content vectors) carry
no popularity by design, so a bot drawing items at random or a history whose items were
replaced by random ones averaged to an item taste much like a broad real user's. Two kinds of
coordinates per item, fixed when the catalogue is built from the training events:

* a one-hot of the item's popularity bin, the bins being quantiles of the training *events*
  (with 10 bins, bin ``b`` holds the items on which the ``b``-th tenth of all events fell,
  least popular first), so a user's weighted mean over items is the histogram of how popular
  their choices are, about uniform for a typical user and piled in the lowest bin for uniform
  draws (on MovieLens-100K the lowest bin holds over half of the catalogue);
* the item's log event count, standardised over the catalogue's items.

Because they ride in the item vectors, the existing item-sum machinery (offline build,
``FeatureState.apply``, ``StateBatch``, catalogue translation) carries them with no new state.
An item without training events, and an item the catalogue does not know at all, gets the
*cold* coordinates: the lowest bin and the log count of zero. That is what it is: nobody
interacted with it when the version was trained.
"""

from __future__ import annotations

import numpy as np

POPULARITY_BINS = 10
"""Event-quantile bins of the histogram when the group is switched on.

Off by default (``ENCODER_POPULARITY_BINS=0``): on MovieLens-100K it lifts the embedding's
out-of-distribution AUROC on bot-like users but moves no profile task, and on the Ciao
cross-domain task it lowered every transfer model's AUC (docs/evaluation.md)."""


def popularity_coordinates(counts: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``[n_items, bins + 1]`` float32 of items with ``counts`` training events,
    and the cold coordinates ``[bins + 1]`` of an item with none.

    Items with equal counts always share a bin, so the bins hold about, not exactly, a
    ``1 / bins`` share of the events each.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of finite non-negative numbers")
    total = counts.sum()
    values, inverse = np.unique(counts, return_inverse=True)
    per_value = np.bincount(inverse, weights=counts, minlength=len(values))
    below = np.concatenate([[0.0], np.cumsum(per_value)[:-1]])
    share_below = below / total if total > 0 else np.zeros_like(below)
    item_bin = np.minimum(np.floor(bins * share_below).astype(np.int64), bins - 1)[inverse]
    logs = np.log1p(counts)
    mean = float(logs.mean()) if len(logs) else 0.0
    std = float(logs.std()) if len(logs) else 0.0
    std = std if std > 1e-9 else 1.0
    coordinates = np.zeros((len(counts), bins + 1), dtype=np.float32)
    coordinates[np.arange(len(counts)), item_bin] = 1.0
    coordinates[:, bins] = (logs - mean) / std
    cold = np.zeros(bins + 1, dtype=np.float32)
    cold[0] = 1.0
    cold[bins] = -mean / std
    return coordinates, cold
