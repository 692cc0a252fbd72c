"""Out-of-distribution scores: higher means "unlike the users this head was trained on".

Three scores, all cheap at prediction time:

* **Mahalanobis** (Lee et al., 2018), the default: the squared distance to the nearest class
  mean under the classes' shared (shrunk) covariance, over every axis.
* **Minor-axes Mahalanobis**: the same distance measured only along the principal axes of the
  within-class scatter that together hold the last 10 % of its variance. Real users keep the
  correlations those low-variance axes encode; a user who breaks them is far there, while the
  high-variance axes, where real users differ most, add noise to the full distance (Kamoi and
  Kobayashi, 2020). It scores corrupted real users better than the full distance but the
  synthetic bots and shuffled histories of the evaluation worse (``docs/evaluation.md``, OOD
  section), so it is offered, not the default.
* **Energy** (Liu et al., 2020): ``-T * logsumexp(logits / T)``; it reads the head's logits.

The first two look at the embedding itself, so they flag users the encoder placed somewhere no
training user sits, whatever the head.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

OODMethod = Literal["mahalanobis", "minor", "energy"]
OOD_METHODS: tuple[OODMethod, ...] = get_args(OODMethod)
"""Every score a head exposes, the default first."""
SHRINKAGE = 0.1
"""Weight of the scaled identity mixed into the covariance, so few users still invert it."""
MAJOR_SHARE = 0.9
"""Share of the within-class variance held by the major axes, which the minor-axes score skips."""
VARIANCE_FLOOR = 1e-3
"""Added to each minor axis's variance (as to the full covariance's diagonal), so an axis along
which the training users do not vary at all cannot turn rounding noise into a huge score."""


def check_method(method: str) -> None:
    """Refuse a misspelt method rather than fall back to another score silently."""
    if method not in OOD_METHODS:
        raise ValueError(f"unknown OOD method {method!r}: use one of {', '.join(OOD_METHODS)}")


def _class_means(x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """One mean per class; a class absent from ``y`` gets the overall mean."""
    return np.stack(
        [x[y == c].mean(axis=0) if (y == c).any() else x.mean(axis=0) for c in range(n_classes)]
    )


class MahalanobisScorer:
    """Class means and a shared precision matrix fitted on training embeddings."""

    def __init__(self, means: np.ndarray, precision: np.ndarray) -> None:
        self.means = means
        self.precision = precision

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int) -> MahalanobisScorer:
        x = x.astype(np.float64)
        means = _class_means(x, y, n_classes)
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


class MinorAxesScorer:
    """Class means and the minor principal axes (with their variances) of the class-centred
    training embeddings."""

    def __init__(self, means: np.ndarray, axes: np.ndarray, variance: np.ndarray) -> None:
        self.means = means
        self.axes = axes
        self.variance = variance

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int) -> MinorAxesScorer:
        x = x.astype(np.float64)
        means = _class_means(x, y, n_classes)
        _, singular, axes = np.linalg.svd(x - means[y], full_matrices=True)
        variance = np.zeros(x.shape[1])
        variance[: len(singular)] = singular**2 / max(len(x) - 1, 1)
        share = np.cumsum(variance) / max(variance.sum(), np.finfo(float).tiny)
        # At least one axis stays, so a one-dimensional embedding is still scored.
        major = min(int(np.searchsorted(share, MAJOR_SHARE)) + 1, x.shape[1] - 1)
        return cls(means, axes[major:], variance[major:] + VARIANCE_FLOOR)

    def score(self, x: np.ndarray) -> np.ndarray:
        """``[n]`` squared distance to the nearest class mean along the minor axes."""
        projected = (x.astype(np.float64)[:, None, :] - self.means[None, :, :]) @ self.axes.T
        return (projected**2 / self.variance).sum(axis=2).min(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "axes": self.axes, "variance": self.variance}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> MinorAxesScorer | None:
        """The scorer saved under ``prefix``; None in a file saved before this score existed."""
        if f"{prefix}axes" not in arrays:
            return None
        return cls(arrays[f"{prefix}means"], arrays[f"{prefix}axes"], arrays[f"{prefix}variance"])


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``[n]`` energy score; higher is more out of distribution."""
    z = logits / temperature
    peak = z.max(axis=1)
    return -temperature * (peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))
