"""Fine sample selection: a domain classifier's density ratio says how target-like a sample is.

A classifier trained to tell target samples (label 1) from source samples (label 0), with both
domains weighing the same in total, estimates ``p(target | x)``; then

    w(x) = p(target | x) / (1 - p(target | x))  ~  q_target(x) / q_source(x),

the importance weight that makes the source distribution look like the target's (covariate
shift). The classifier is L2-regularised logistic regression fitted by Newton's method on
standardised inputs; it is exact for Gaussian domains that differ in their means, which the
tests use as the known answer. Numpy only: this module is part of the package core.
"""

from __future__ import annotations

from typing import Self

import numpy as np


class DomainClassifier:
    """Logistic regression source (0) vs target (1), each domain weighing half.

    Args:
        l2: ridge penalty on the standardised coefficients, relative to the mean loss; larger
            keeps the weights closer to 1 (a smoother density ratio).
        iterations: Newton steps at most (it converges in a handful).
    """

    def __init__(self, *, l2: float = 1e-2, iterations: int = 25) -> None:
        self.l2 = l2
        self.iterations = iterations
        self.shift = np.zeros(0)
        self.scale = np.ones(0)
        self.coef = np.zeros(0)

    def fit(self, source: np.ndarray, target: np.ndarray) -> Self:
        x = np.concatenate([np.asarray(source, np.float64), np.asarray(target, np.float64)])
        y = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
        if len(source) == 0 or len(target) == 0:
            raise ValueError("the domain classifier needs samples from both domains")
        sample_w = np.where(y == 1, 0.5 / len(target), 0.5 / len(source))
        self.shift = x.mean(axis=0)
        self.scale = x.std(axis=0) + 1e-8
        z = self._design(x)
        beta = np.zeros(z.shape[1])
        penalty = np.full(z.shape[1], self.l2)
        penalty[0] = 0.0  # the intercept is not shrunk
        for _ in range(self.iterations):
            p = _sigmoid(z @ beta)
            grad = z.T @ (sample_w * (p - y)) + penalty * beta
            hess = (z * (sample_w * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-12)
            step = np.linalg.solve(hess, grad)
            beta -= step
            if np.abs(step).max() < 1e-8:
                break
        self.coef = beta
        return self

    def logit(self, x: np.ndarray) -> np.ndarray:
        """``log w(x)``: the log density ratio target / source."""
        if len(self.coef) == 0:
            raise RuntimeError("fit the domain classifier first")
        return self._design(np.asarray(x, np.float64)) @ self.coef

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``p(target | x)`` under equal domain priors."""
        return _sigmoid(self.logit(x))

    def density_ratio(self, x: np.ndarray) -> np.ndarray:
        """``q_target(x) / q_source(x)``, unnormalised."""
        return np.exp(np.clip(self.logit(x), -50, 50))

    def _design(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.shift) / self.scale
        return np.concatenate([np.ones((len(z), 1)), z], axis=1)


def importance_weights(ratio: np.ndarray, *, max_weight: float = 10.0) -> np.ndarray:
    """Density ratios clipped at ``max_weight`` times their mean, then rescaled to mean 1.

    Clipping bounds the variance a handful of extremely target-like source samples would add.
    The cap is the fixed point ``c = max_weight * mean(min(ratio, c))``, so it holds after the
    rescaling too: no weight exceeds ``max_weight`` and the source's total weight is its
    sample count.
    """
    if max_weight <= 1:
        raise ValueError("max_weight must be above 1")
    ratio = np.asarray(ratio, dtype=np.float64)
    if len(ratio) == 0:
        return ratio
    cap = max_weight * ratio.mean()
    for _ in range(100):
        nxt = max_weight * np.minimum(ratio, cap).mean()
        if nxt >= cap * (1 - 1e-9):
            break
        cap = nxt
    w = np.minimum(ratio, cap)
    return w / w.mean()


def fine_select(weights: np.ndarray, min_weight: float) -> np.ndarray:
    """Boolean mask dropping samples whose normalised weight is below ``min_weight``."""
    return np.asarray(weights) >= min_weight


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
