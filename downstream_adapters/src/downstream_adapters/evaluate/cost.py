"""Infrastructure cost of N downstream tasks: N per-task feature pipelines versus one shared
embedding with N small heads, measured on the same users.

For each row the harness fits the models (not timed), then measures:

* ``feature_bytes_per_user``: the bytes of the per-user features each pipeline materialises,
  summed over the N pipelines (each team stores its own); for the shared rows, the one stored
  float32 embedding. ``service_state_bytes_per_user`` is what the embedding service keeps per
  user beside it (the refresher's feature state), when the embeddings file records it;
  ``stored_bytes_per_user`` is the sum, the figure the pipelines are compared on.
* ``model_bytes``: the parameters of all N models (and each pipeline's own SVD projection).
* ``cpu_us_per_user``: process CPU time to produce all N predictions for every user, divided
  by the number of users, best of ``repeats``: the per-task pipelines build their features from
  the raw events and predict; the shared rows read the stored embedding and run the heads. The
  encoder's own cost is paid once per event by the service, whatever the number of tasks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from downstream_adapters.evaluate import baselines
from downstream_adapters.evaluate.data import Tables
from downstream_adapters.evaluate.harness import Features, Task
from downstream_adapters.heads import LinearHead, MultiTaskHead

SHARED_ROWS = ("embedding + LinearHead per task", "embedding + one MultiTaskHead")


@dataclass
class _Pipeline:
    """One team's pipeline: features from raw events, then its own model."""

    features: Callable[[Tables, list[str]], Features]
    model: Any
    extra_bytes: int = 0


def _nbytes(x: Features) -> int:
    if sparse.issparse(x):
        return int(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes)
    return int(np.asarray(x).nbytes)


def _model_bytes(model: Any) -> int:
    """Bytes of every fitted array of a scikit-learn pipeline (coefficients, scaler moments)."""
    total = 0
    for step in model.named_steps.values():
        total += sum(
            v.nbytes
            for v in vars(step).values()
            if isinstance(v, np.ndarray) and v.dtype.kind == "f"
        )
    return total


def _svd_features(tables: Tables, users: list[str], seed: int) -> tuple[Callable, int]:
    """A fitted projection (the pipeline's own artefact) and its size in bytes."""
    matrix = baselines.interaction_matrix(tables, users)
    dim = min(64, min(matrix.shape) - 1)  # as the baseline does on small catalogues
    svd = TruncatedSVD(dim, random_state=seed).fit(matrix)
    components = svd.components_.astype(np.float32).T

    def features(t: Tables, u: list[str]) -> np.ndarray:
        return np.asarray(baselines.interaction_matrix(t, u) @ components, dtype=np.float32)

    return features, int(components.nbytes)


def _fit_pipelines(
    kind: str, tables: Tables, users: list[str], tasks: list[Task], seed: int
) -> list[_Pipeline]:
    out = []
    for task in tasks:
        extra = 0
        if kind == "raw":
            build: Callable[[Tables, list[str]], Features] = baselines.raw_items
            model = make_pipeline(LogisticRegression(max_iter=3000))
        elif kind == "svd":
            build, extra = _svd_features(tables, users, seed)
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        else:
            build = baselines.aggregates
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(build(tables, users), task.y)
        out.append(_Pipeline(build, model, extra))
    return out


def _best_cpu(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best


def _per_task_row(
    pipelines: list[_Pipeline], tables: Tables, users: list[str], repeats: int
) -> dict[str, Any]:
    def predict_all() -> list[Features]:
        built = []
        for p in pipelines:
            x = p.features(tables, users)
            p.model.predict_proba(x)
            built.append(x)
        return built

    cpu = _best_cpu(predict_all, repeats)
    stored = sum(_nbytes(x) for x in predict_all())
    return {
        "n_models": len(pipelines),
        "feature_bytes_per_user": stored / len(users),
        "service_state_bytes_per_user": None,
        "stored_bytes_per_user": stored / len(users),
        "model_bytes": sum(_model_bytes(p.model) + p.extra_bytes for p in pipelines),
        "cpu_us_per_user": 1e6 * cpu / len(users),
    }


def _head_bytes(head: Any) -> int:
    """Float parameters of a fitted head (weights, standardisation, OOD means and precision)."""
    arrays = (np.asarray(v) for v in head.state()[1].values())
    return sum(a.nbytes for a in arrays if a.dtype.kind == "f")


def measure(
    tables: Tables,
    users: list[str],
    embedding: np.ndarray,
    tasks: list[Task],
    *,
    state_bytes: np.ndarray | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``{row: {n_models, feature_bytes_per_user, service_state_bytes_per_user, model_bytes,
    cpu_us_per_user}}`` for ``len(tasks)`` tasks; ``embedding`` rows follow ``users``."""
    rows: dict[str, dict[str, Any]] = {}
    for kind, name in (("raw", "raw items"), ("svd", "svd-64"), ("aggregates", "aggregates")):
        pipelines = _fit_pipelines(kind, tables, users, tasks, seed)
        rows[f"{name} + LR per task"] = _per_task_row(pipelines, tables, users, repeats)
    store = np.ascontiguousarray(embedding, dtype=np.float32)
    index = np.arange(len(users))
    state = None if state_bytes is None else float(np.mean(state_bytes))
    heads = [LinearHead(seed=seed).fit(store, t.y) for t in tasks]
    multi = MultiTaskHead(seed=seed).fit(store, {t.name: t.y for t in tasks})
    shared: dict[str, tuple[int, int, Callable[[], object]]] = {
        SHARED_ROWS[0]: (
            len(heads),
            sum(_head_bytes(h) for h in heads),
            lambda: [h.predict_proba(store[index]) for h in heads],
        ),
        SHARED_ROWS[1]: (1, _head_bytes(multi), lambda: multi.predict_proba(store[index])),
    }
    for name, (n_models, model_bytes, run) in shared.items():
        rows[name] = {
            "n_models": n_models,
            "feature_bytes_per_user": store[index].nbytes / len(users),
            "service_state_bytes_per_user": state,
            "stored_bytes_per_user": store[index].nbytes / len(users) + (state or 0.0),
            "model_bytes": model_bytes,
            "cpu_us_per_user": 1e6 * _best_cpu(run, repeats) / len(users),
        }
    return rows


def comparisons(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each shared row against each per-task pipeline: how many times fewer bytes and CPU."""
    out = []
    for mine in SHARED_ROWS:
        for baseline, theirs in rows.items():
            if baseline in SHARED_ROWS:
                continue
            for figure in ("feature_bytes_per_user", "stored_bytes_per_user", "cpu_us_per_user"):
                out.append(
                    {
                        "model": mine,
                        "figure": figure,
                        "value": rows[mine][figure],
                        "baseline": baseline,
                        "baseline_value": theirs[figure],
                        "ratio": theirs[figure] / rows[mine][figure],
                    }
                )
    return out
