"""Out-of-distribution scores: higher means "unlike the users this head was trained on".

Two scores, both cheap at prediction time:

* **Mahalanobis** (Lee et al., 2018): the squared distance from an embedding to the nearest
  class mean under the classes' shared (shrunk) covariance. It looks at the embedding itself,
  so it flags users the encoder placed somewhere no training user sits, whatever the head.
* **Energy** (Liu et al., 2020): ``-T * logsumexp(logits / T)``; it reads the head's logits.
"""

from __future__ import annotations

import numpy as np

SHRINKAGE = 0.1
"""Weight of the scaled identity mixed into the covariance, so few users still invert it."""


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


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``[n]`` energy score; higher is more out of distribution."""
    z = logits / temperature
    peak = z.max(axis=1)
    return -temperature * (peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))
