"""One shared hidden layer and a linear head per task, trained on all tasks at once.

For N tasks this stores one hidden layer instead of N models and runs one shared matrix product
per user; the evaluation compares it with the per-task heads in the same table. Each task keeps
its own temperature and Mahalanobis statistics (class means, covariance); the kNN OOD score
needs no labels, so the tasks share one bank of training embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from downstream_adapters.heads.base import balanced_weights
from downstream_adapters.heads.calibration import fit_temperature, softmax
from downstream_adapters.heads.ood import (
    DEFAULT_METHOD,
    KNNScorer,
    MahalanobisScorer,
    OODMethod,
    check_method,
    energy,
    require_knn,
)


class _MultiTask(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, sizes: Mapping[str, int]) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, k) for t, k in sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(x)
        return {t: head(h) for t, head in self.heads.items()}


class MultiTaskHead:
    """Fit with ``{task: labels}`` (all aligned with the rows of ``x``)."""

    kind = "multitask"

    def __init__(
        self,
        *,
        hidden: int = 128,
        dropout: float = 0.3,
        l2: float = 1e-3,
        epochs: int = 60,
        lr: float = 3e-3,
        class_weight: str | None = None,
        seed: int = 0,
    ) -> None:
        self.config: dict[str, Any] = {
            "hidden": hidden,
            "dropout": dropout,
            "l2": l2,
            "epochs": epochs,
            "lr": lr,
            "class_weight": class_weight,
            "seed": seed,
        }
        self.classes_: dict[str, np.ndarray] = {}
        self.temperature: dict[str, float] = {}
        self.scorers: dict[str, MahalanobisScorer] = {}
        self.knn: KNNScorer | None = None
        self.shift = np.zeros(0, dtype=np.float32)
        self.scale = np.ones(0, dtype=np.float32)
        self.module: _MultiTask | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.classes_)

    def fit(self, x: np.ndarray, labels: Mapping[str, np.ndarray]) -> Self:
        x = np.asarray(x, dtype=np.float32)
        self.shift, self.scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = torch.from_numpy(self._standardise(x))
        self.knn = KNNScorer.fit(z.numpy())
        targets: dict[str, torch.Tensor] = {}
        losses: dict[str, nn.Module] = {}
        for task, y in labels.items():
            self.classes_[task], index = np.unique(np.asarray(y), return_inverse=True)
            k = len(self.classes_[task])
            weights = balanced_weights(index, k) if self.config["class_weight"] else np.ones(k)
            targets[task] = torch.from_numpy(index.astype(np.int64))
            losses[task] = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
            self.scorers[task] = MahalanobisScorer.fit(z.numpy(), index, k)
            self.temperature[task] = 1.0
        torch.manual_seed(self.config["seed"])
        c = self.config
        sizes = {t: len(k) for t, k in self.classes_.items()}
        self.module = _MultiTask(x.shape[1], c["hidden"], c["dropout"], sizes)
        optimiser = torch.optim.Adam(self.module.parameters(), lr=c["lr"], weight_decay=c["l2"])
        for _ in range(c["epochs"]):
            order = torch.randperm(len(z))
            for start in range(0, len(z), 256):
                rows = order[start : start + 256]
                out = self.module(z[rows])
                loss = sum(losses[t](out[t], targets[t][rows]) for t in targets)
                optimiser.zero_grad()
                loss.backward()  # type: ignore[union-attr]
                optimiser.step()
        self.module.eval()
        return self

    def logits(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``{task: [n, n_classes]}`` uncalibrated logits from one shared forward pass."""
        if self.module is None:
            raise RuntimeError("fit or load the head first")
        with torch.no_grad():
            out = self.module(torch.from_numpy(self._standardise(np.asarray(x, np.float32))))
        return {t: v.numpy().astype(np.float64) for t, v in out.items()}

    def calibrate(self, x: np.ndarray, labels: Mapping[str, np.ndarray]) -> dict[str, float]:
        logits = self.logits(x)
        for task, y in labels.items():
            index = np.searchsorted(self.classes_[task], np.asarray(y))
            self.temperature[task] = fit_temperature(logits[task], index)
        return dict(self.temperature)

    def predict_proba(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {t: softmax(v, self.temperature[t]) for t, v in self.logits(x).items()}

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {t: self.classes_[t][v.argmax(axis=1)] for t, v in self.logits(x).items()}

    def ood_score(self, x: np.ndarray, task: str, method: OODMethod = DEFAULT_METHOD) -> np.ndarray:
        """``[n]`` OOD score against ``task``'s classes (as ``ClassifierHead.ood_score``); the
        ``knn`` score uses no labels, so it is the same for every task."""
        check_method(method)
        if method == "energy":
            return energy(self.logits(x)[task], self.temperature[task])
        z = self._standardise(np.asarray(x, np.float32))
        if method == "knn":
            return require_knn(self.knn).score(z)
        return self.scorers[task].score(z)

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.module is None:
            raise RuntimeError("fit the head before saving it")
        arrays = {f"module.{k}": v.detach().numpy() for k, v in self.module.state_dict().items()}
        for task in self.tasks:
            arrays[f"classes.{task}"] = self.classes_[task]
            for name, value in self.scorers[task].arrays().items():
                arrays[f"ood.{task}.{name}"] = value
        if self.knn is not None:
            arrays.update({f"ood.knn_{k}": v for k, v in self.knn.arrays().items()})
        arrays.update(shift=self.shift, scale=self.scale)
        config = {
            "kind": self.kind,
            "config": self.config,
            "temperature": self.temperature,
            "tasks": self.tasks,
        }
        return config, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        head = cls(**config["config"])
        head.shift, head.scale = arrays["shift"], arrays["scale"]
        for task in config["tasks"]:
            head.classes_[task] = arrays[f"classes.{task}"]
            head.scorers[task] = MahalanobisScorer(
                arrays[f"ood.{task}.means"], arrays[f"ood.{task}.precision"]
            )
        head.knn = KNNScorer.from_arrays(arrays, "ood.knn_")
        head.temperature = {t: float(v) for t, v in config["temperature"].items()}
        c = head.config
        sizes = {t: len(k) for t, k in head.classes_.items()}
        head.module = _MultiTask(len(head.shift), c["hidden"], c["dropout"], sizes)
        head.module.load_state_dict(
            {
                k.removeprefix("module."): torch.from_numpy(np.array(v))
                for k, v in arrays.items()
                if k.startswith("module.")
            }
        )
        head.module.eval()
        return head
