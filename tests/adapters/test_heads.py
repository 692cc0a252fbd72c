"""Heads on embeddings with known structure: accuracy, calibration, OOD, save/load round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from downstream_adapters.artifact import load, save
from downstream_adapters.heads import HEADS, MultiTaskHead
from downstream_adapters.heads.calibration import nll
from downstream_adapters.heads.ood import energy

from downstream_adapters import Pin


def clusters(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping Gaussian classes in 16 dims, the first twice as frequent."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 1.2
    y = rng.choice(3, size=n, p=[0.5, 0.25, 0.25])
    return (centres[y] + rng.normal(size=(n, 16))).astype(np.float32), y


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    scores = np.concatenate([negative, positive])
    ranks = scores.argsort().argsort() + 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_learns_calibrates_scores_ood_and_round_trips(kind: str, tmp_path: Path) -> None:
    x, y = clusters(900)
    head = HEADS[kind](class_weight="balanced").fit(x[:600], y[:600])
    raw_nll = nll(head.logits(x[600:750]), y[600:750])
    head.calibrate(x[600:750], y[600:750])
    assert nll(head.logits(x[750:]), y[750:], head.temperature) <= raw_nll + 0.05
    assert (head.predict(x[750:]) == y[750:]).mean() > 0.8

    far = x[750:] * 3 + 6
    assert auroc(head.ood_score(x[750:]), head.ood_score(far)) > 0.95
    assert head.ood_score(x[:5], method="energy").shape == (5,)

    path = save(tmp_path / kind, head, Pin("v1", 16, "h"))
    loaded = load(path).head
    np.testing.assert_allclose(loaded.predict_proba(x[750:]), head.predict_proba(x[750:]))
    np.testing.assert_allclose(loaded.ood_score(x[750:]), head.ood_score(x[750:]))


def test_energy_is_higher_for_flatter_logits() -> None:
    assert energy(np.array([[5.0, 0.0]]))[0] < energy(np.array([[0.1, 0.0]]))[0]


def test_multitask_head_predicts_every_task_and_round_trips(tmp_path: Path) -> None:
    x, y = clusters(800)
    parity = (x[:, 0] > 0).astype(int)
    head = MultiTaskHead().fit(x[:600], {"cluster": y[:600], "sign": parity[:600]})
    head.calibrate(x[600:700], {"cluster": y[600:700], "sign": parity[600:700]})
    predicted = head.predict(x[700:])
    assert (predicted["cluster"] == y[700:]).mean() > 0.8
    assert (predicted["sign"] == parity[700:]).mean() > 0.8
    loaded = load(save(tmp_path / "mt", head, Pin("v1", 16, "h"))).head
    for task, proba in head.predict_proba(x[700:]).items():
        np.testing.assert_allclose(loaded.predict_proba(x[700:])[task], proba)
