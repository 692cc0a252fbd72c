"""Temperature scaling (Guo et al., 2017): one scalar that makes a head's probabilities honest.

The temperature divides the logits, so it changes confidence but never the predicted class; it
is fitted on held-out data, never on the rows the head was trained on.
"""

from __future__ import annotations

import numpy as np

_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of class indices ``y``."""
    p = softmax(logits, temperature)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising held-out NLL: a log-spaced grid, then a local refinement.

    A one-dimensional, well-behaved problem: a grid is robust where Newton steps on few rows
    can overshoot.
    """
    losses = [nll(logits, y, t) for t in _GRID]
    best = int(np.argmin(losses))
    low, high = _GRID[max(best - 1, 0)], _GRID[min(best + 1, len(_GRID) - 1)]
    fine = np.linspace(low, high, 41)
    return float(fine[int(np.argmin([nll(logits, y, t) for t in fine]))])


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Gap between confidence and accuracy, averaged over equal-width confidence bins."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(gap)
