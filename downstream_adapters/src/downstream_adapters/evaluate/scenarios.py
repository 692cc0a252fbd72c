"""Scenarios from the profiling paper: data insufficiency, class imbalance and OOD detection.

* **Data insufficiency**: ``k`` labelled users per class (the rest are the test set), repeated
  over random draws; the few-shot heads and a linear probe on the embedding against logistic
  regression on the raw baselines. Balanced accuracy, so a majority-class guess scores 1/C.
* **Class imbalance**: k-fold CV with and without reweighting the loss by inverse class
  frequency, reporting balanced accuracy and macro-F1.
* **Out of distribution**: each head, fitted on the training folds of the real users, scores
  the held-out real users and users of another distribution (bots, shuffled histories, another
  data set) encoded by the same version; the AUROC of separating them, per score.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from downstream_adapters.evaluate.harness import Features, Task, folds
from downstream_adapters.heads import (
    ClassifierHead,
    LinearHead,
    MatchingHead,
    MLPHead,
    RelationHead,
)
from downstream_adapters.heads.ood import OOD_METHODS

SHOTS = (1, 5, 10, 20)
OOD_TARGET = 0.9
OOD_TARGET_CASES = ("bot", "shuffled")
"""The cases the 0.9 AUROC target applies to; other cases are reported without a target."""
OOD_HEADS: dict[str, Callable[[int], ClassifierHead]] = {
    "LinearHead": lambda seed: LinearHead(seed=seed),
    "MLPHead": lambda seed: MLPHead(seed=seed),
    "MatchingHead": lambda seed: MatchingHead(seed=seed),
    "RelationHead": lambda seed: RelationHead(seed=seed),
}


def _draw(y: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``k`` rows per class for training, every other row of those classes for testing; classes
    with at most ``k`` users are left out (nothing would remain to test on)."""
    classes = [c for c in np.unique(y) if (y == c).sum() > k]
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in classes])
    test = np.setdiff1d(np.flatnonzero(np.isin(y, classes)), train)
    return train, test


def few_shot(
    embedding: np.ndarray,
    baselines: Mapping[str, Features],
    task: Task,
    *,
    shots: tuple[int, ...] = SHOTS,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{method: {str(k): mean balanced accuracy}}`` (plus ``<k>_std``)."""
    heads: dict[str, Callable[[int], Any]] = {
        "matching": lambda k: MatchingHead(shots=max(k - 1, 1), seed=seed),
        "relation": lambda k: RelationHead(shots=max(k - 1, 1), seed=seed),
        "linear probe": lambda k: LinearHead(l2=1e-2, seed=seed),
    }
    raw: dict[str, list[float]] = {}
    rng = np.random.default_rng(seed)
    for k in shots:
        for _ in range(repeats):
            train, test = _draw(task.y, k, rng)
            y_train, y_test = task.y[train], task.y[test]
            for name, make in heads.items():
                predicted = make(k).fit(embedding[train], y_train).predict(embedding[test])
                raw.setdefault(f"{name}|{k}", []).append(balanced_accuracy_score(y_test, predicted))
            for name, x in baselines.items():
                model = LogisticRegression(max_iter=2000)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(x[train], y_train)
                score = balanced_accuracy_score(y_test, model.predict(x[test]))
                raw.setdefault(f"{name} (LR)|{k}", []).append(score)
    out: dict[str, dict[str, float]] = {}
    for key, values in raw.items():
        method, k = key.split("|")
        out.setdefault(method, {})[k] = float(np.mean(values))
        out[method][f"{k}_std"] = float(np.std(values))
    return out


def imbalance(
    embedding: np.ndarray,
    raw_items: Features,
    task: Task,
    *,
    k: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{method: {balanced_accuracy, macro_f1}}`` with and without class reweighting."""
    splits = folds(task, k, seed)
    rows: dict[str, list[tuple[float, float]]] = {}
    for train, test in splits:
        y_train, y_test = task.y[train], task.y[test]
        for weight in (None, "balanced"):
            suffix = "reweighted" if weight else "plain"
            head = LinearHead(class_weight=weight, seed=seed).fit(embedding[train], y_train)
            rows.setdefault(f"embedding + LinearHead, {suffix}", []).append(
                _both(y_test, head.predict(embedding[test]))
            )
            model = LogisticRegression(max_iter=2000, class_weight=weight)
            x = raw_items if sparse.issparse(raw_items) else np.asarray(raw_items)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(x[train], y_train)
            rows.setdefault(f"raw items (LR), {suffix}", []).append(
                _both(y_test, model.predict(x[test]))
            )
    return {
        name: {
            "balanced_accuracy": float(np.mean([v[0] for v in values])),
            "macro_f1": float(np.mean([v[1] for v in values])),
        }
        for name, values in rows.items()
    }


def _both(y: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    return (
        float(balanced_accuracy_score(y, predicted)),
        float(f1_score(y, predicted, average="macro")),
    )


def ood(
    embedding: np.ndarray,
    outliers: Mapping[str, np.ndarray],
    task: Task,
    *,
    heads: Mapping[str, Callable[[int], ClassifierHead]] = OOD_HEADS,
    k: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"<head>, <score>": {case: {auroc, auroc_std, target, held}}}`` over ``k`` folds.

    The positives of a fold are every user of the case, the negatives the fold's held-out real
    users; nothing about the OOD users is seen when fitting, so no score is tuned on them.
    ``target`` is :data:`OOD_TARGET` for the cases in :data:`OOD_TARGET_CASES`, else ``None``;
    it is the default score's target (``knn``), and the other scores' rows are held against it
    for comparison.
    """
    raw: dict[str, dict[str, list[float]]] = {}
    for train, test in folds(task, k, seed):
        for name, make in heads.items():
            head = make(seed).fit(embedding[train], task.y[train])
            for method in OOD_METHODS:
                inside = head.ood_score(embedding[test], method)
                for case, x in outliers.items():
                    scores = np.concatenate([inside, head.ood_score(x, method)])
                    truth = np.r_[np.zeros(len(inside)), np.ones(len(x))]
                    row = raw.setdefault(f"{name}, {method}", {})
                    row.setdefault(case, []).append(float(roc_auc_score(truth, scores)))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row, by_case in raw.items():
        for case, values in by_case.items():
            target = OOD_TARGET if case in OOD_TARGET_CASES else None
            auroc = float(np.mean(values))
            out.setdefault(row, {})[case] = {
                "auroc": auroc,
                "auroc_std": float(np.std(values)),
                "target": target,
                "held": None if target is None else auroc >= target,
            }
    return out
