"""k-fold cross-validation of every representation and head on every task, in one table.

Every representation (the embedding and each baseline) gets the same model: logistic regression
whose inverse regularisation ``C`` is tuned by an inner 3-fold search, on standardised dense
features or on the L2-normalised sparse item vector. The package's own heads (linear, MLP, the
multi-task head) run on the embedding with fixed settings beside them. All representations
share the same outer folds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from downstream_adapters.heads import LinearHead, MLPHead, MultiTaskHead

C_GRID = [0.001, 0.01, 0.1, 1.0, 10.0]
Features = np.ndarray | sparse.csr_matrix


@dataclass
class Task:
    name: str
    y: np.ndarray  # class labels (strings), aligned with the users under evaluation

    @property
    def binary(self) -> bool:
        return len(np.unique(self.y)) == 2

    @property
    def primary(self) -> str:
        return "auc" if self.binary else "accuracy"


def tuned_logistic(binary: bool, dense: bool, seed: int, class_weight: str | None = None) -> Any:
    model = LogisticRegression(max_iter=3000, class_weight=class_weight)
    pipeline = make_pipeline(StandardScaler(), model) if dense else make_pipeline(model)
    return GridSearchCV(
        pipeline,
        {"logisticregression__C": C_GRID},
        cv=StratifiedKFold(3, shuffle=True, random_state=seed),
        scoring="roc_auc" if binary else "accuracy",
    )


def scores(task: Task, classes: np.ndarray, proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    predicted = classes[proba.argmax(axis=1)]
    out = {
        "accuracy": float(accuracy_score(y, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "macro_f1": float(f1_score(y, predicted, average="macro")),
    }
    if task.binary:
        out["auc"] = float(roc_auc_score(y == classes[1], proba[:, 1]))
    return out


def folds(task: Task, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rare classes with fewer members than folds
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(task.y, task.y))


def _mean(per_fold: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in per_fold[0]:
        values = [f[metric] for f in per_fold]
        out[metric] = float(np.mean(values))
        out[f"{metric}_std"] = float(np.std(values))
    return out


def evaluate_logistic(
    x: Features, task: Task, splits: list[tuple[np.ndarray, np.ndarray]], seed: int
) -> dict[str, float]:
    dense = not sparse.issparse(x)
    per_fold = []
    for train, test in splits:
        model = tuned_logistic(task.binary, dense, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x[train], task.y[train])
        per_fold.append(scores(task, model.classes_, model.predict_proba(x[test]), task.y[test]))
    return _mean(per_fold)


def evaluate_head(
    make: Callable[[], Any],
    x: np.ndarray,
    task: Task,
    splits: list[tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
    per_fold = []
    for train, test in splits:
        head = make().fit(x[train], task.y[train])
        per_fold.append(scores(task, head.classes_, head.predict_proba(x[test]), task.y[test]))
    return _mean(per_fold)


def evaluate_multitask(
    x: np.ndarray, tasks: list[Task], splits: list[tuple[np.ndarray, np.ndarray]], seed: int
) -> dict[str, dict[str, float]]:
    per_task: dict[str, list[dict[str, float]]] = {t.name: [] for t in tasks}
    for train, test in splits:
        head = MultiTaskHead(seed=seed).fit(x[train], {t.name: t.y[train] for t in tasks})
        proba = head.predict_proba(x[test])
        for t in tasks:
            per_task[t.name].append(scores(t, head.classes_[t.name], proba[t.name], t.y[test]))
    return {name: _mean(values) for name, values in per_task.items()}


def run_table(
    representations: Mapping[str, Features],
    embedding: np.ndarray,
    tasks: list[Task],
    *,
    k: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{row: {task: {metric: value}}}``; rows are representations, then the package heads.

    The splits are stratified by the first task and shared by every task and row, so the
    multi-task head sees exactly the folds the per-task heads see.
    """
    splits = folds(tasks[0], k, seed)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, x in representations.items():
        results[name] = {t.name: evaluate_logistic(x, t, splits, seed) for t in tasks}
    results["embedding + LinearHead"] = {
        t.name: evaluate_head(lambda: LinearHead(seed=seed), embedding, t, splits) for t in tasks
    }
    results["embedding + MLPHead"] = {
        t.name: evaluate_head(lambda: MLPHead(seed=seed), embedding, t, splits) for t in tasks
    }
    results["embedding + MultiTaskHead"] = evaluate_multitask(embedding, tasks, splits, seed)
    return results
