"""Out-of-distribution scores: higher means "unlike the users this head was trained on".

Three scores, all cheap at prediction time:

* **kNN** (Sun et al., 2022), the default: the Euclidean distance from a user's standardised
  embedding to its k-th nearest training user (k = 5). It makes no assumption about the shape
  of the training distribution and ignores the labels, so it flags a user who sits where no
  training user does even when that place is near a class mean.
* **Mahalanobis** (Lee et al., 2018): the squared distance to the nearest class mean under the
  classes' shared (shrunk) covariance, over every axis.
* **Energy** (Liu et al., 2020): ``-T * logsumexp(logits / T)``; it reads the head's logits.

The first two look at the embedding itself, so they flag users the encoder placed somewhere no
training user sits, whatever the head. Why kNN with k = 5 is the default, and how far that
choice can be trusted, is measured in ``docs/evaluation.md`` (OOD section).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

OODMethod = Literal["knn", "mahalanobis", "energy"]
OOD_METHODS: tuple[OODMethod, ...] = get_args(OODMethod)
"""Every score a head exposes, the default first."""
DEFAULT_METHOD: OODMethod = OOD_METHODS[0]
SHRINKAGE = 0.1
"""Weight of the scaled identity mixed into the covariance, so few users still invert it."""
NEIGHBOURS = 5
"""k of the kNN score. k = 1 is fooled by an outlier derived from a training user (a bot that
copies a real profile lands next to its source); k = 5 is not (``docs/evaluation.md``)."""
MAX_REFERENCE = 5000
"""Training users a head keeps for the kNN score, so its file stays bounded (5,000 x dim
float32: 1.28 MB at 64 dims) however many users it was fitted on."""
CHUNK_CELLS = 4_000_000
"""Query x reference distances computed at once (32 MB of float64), so scoring any number of
users never builds the full query x reference matrix."""


def check_method(method: str) -> None:
    """Refuse a misspelt method rather than fall back to another score silently."""
    if method not in OOD_METHODS:
        raise ValueError(f"unknown OOD method {method!r}: use one of {', '.join(OOD_METHODS)}")


class MahalanobisScorer:
    """Class means and a shared precision matrix fitted on training embeddings."""

    def __init__(self, means: np.ndarray, precision: np.ndarray) -> None:
        self.means = means
        self.precision = precision

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int) -> MahalanobisScorer:
        x = x.astype(np.float64)
        means = np.stack(
            [x[y == c].mean(axis=0) if (y == c).any() else x.mean(axis=0) for c in range(n_classes)]
        )
        centred = x - means[y]
        cov = centred.T @ centred / max(len(x) - 1, 1)
        scale = np.trace(cov) / len(cov)
        cov = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * np.eye(len(cov))
        # The absolute floor keeps a one-user-per-class fit (zero scatter) invertible.
        return cls(means, np.linalg.inv(cov + 1e-3 * np.eye(len(cov))))

    def score(self, x: np.ndarray) -> np.ndarray:
        """``[n]`` squared distance to the nearest class mean."""
        diff = x.astype(np.float64)[:, None, :] - self.means[None, :, :]
        return np.einsum("ncd,de,nce->nc", diff, self.precision, diff).min(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "precision": self.precision}


class KNNScorer:
    """A bank of training embeddings (already standardised by the head, with the same shift and
    scale as the Mahalanobis score) and the k of the k-th nearest neighbour.

    The bank holds at most :data:`MAX_REFERENCE` rows: a larger training set is subsampled
    uniformly at random with a fixed seed, so refitting on the same users keeps the same bank.
    """

    def __init__(self, reference: np.ndarray, k: int) -> None:
        self.reference = reference
        self.k = k

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        k: int = NEIGHBOURS,
        max_rows: int = MAX_REFERENCE,
        seed: int = 0,
    ) -> KNNScorer:
        """Keep (a subsample of) ``x``; ``k`` is capped at one less than the bank's rows, so a
        training user scored against a bank holding it still has k other neighbours."""
        x = np.asarray(x, dtype=np.float32)
        if len(x) > max_rows:
            keep = np.random.default_rng(seed).choice(len(x), size=max_rows, replace=False)
            x = x[np.sort(keep)]
        return cls(np.ascontiguousarray(x), max(min(k, len(x) - 1), 1))

    def score(self, x: np.ndarray, chunk_cells: int = CHUNK_CELLS) -> np.ndarray:
        """``[n]`` Euclidean distance to the k-th nearest reference row, computed over blocks of
        queries of at most ``chunk_cells`` query x reference distances."""
        queries = np.asarray(x, dtype=np.float64)
        reference = self.reference.astype(np.float64)
        norms = (reference**2).sum(axis=1)
        rows = max(chunk_cells // len(reference), 1)
        out = np.empty(len(queries))
        for start in range(0, len(queries), rows):
            block = queries[start : start + rows]
            squared = (block**2).sum(axis=1)[:, None] - 2.0 * block @ reference.T + norms[None, :]
            kth = np.partition(squared, self.k - 1, axis=1)[:, self.k - 1]
            # The expansion can dip below zero by rounding for a query on a reference row.
            out[start : start + rows] = np.sqrt(np.maximum(kth, 0.0))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"reference": self.reference, "k": np.array(self.k)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> KNNScorer | None:
        """The scorer saved under ``prefix``; None in a file saved before this score existed."""
        if f"{prefix}reference" not in arrays:
            return None
        return cls(np.asarray(arrays[f"{prefix}reference"]), int(arrays[f"{prefix}k"]))


def require_knn(scorer: KNNScorer | None) -> KNNScorer:
    """The kNN scorer, or a clear error for a head file saved before the kNN score existed
    (such a file keeps no training embeddings, so the score cannot be rebuilt from it)."""
    if scorer is None:
        raise RuntimeError(
            "OOD method 'knn' (the default) needs the training embeddings, which this head file "
            "was saved without: use ood_score(x, method='mahalanobis') or refit the head"
        )
    return scorer


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``[n]`` energy score; higher is more out of distribution."""
    z = logits / temperature
    peak = z.max(axis=1)
    return -temperature * (peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))
