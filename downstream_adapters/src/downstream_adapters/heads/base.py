"""What every classifier head shares: label encoding, input standardisation, calibration, OOD.

A head is a small torch module over standardised embeddings. Subclasses say how to build and
train the module; this class turns it into class probabilities (divided by a fitted
temperature), an OOD score, and a flat ``(config, arrays)`` state that saves without pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn

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


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (k * count_c)`` per class: every class weighs the same in the loss in total."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


class ClassifierHead(ABC):
    """Fit on ``[n, dim]`` float embeddings and labels of any sortable type.

    Args:
        class_weight: ``"balanced"`` reweights the loss against class imbalance.
        seed: Seeds initial weights and sampling, so a fit is reproducible.
    """

    kind: ClassVar[str]

    def __init__(self, *, class_weight: str | None = None, seed: int = 0, **config: Any) -> None:
        self.config: dict[str, Any] = {"class_weight": class_weight, "seed": seed, **config}
        self.classes_: np.ndarray = np.zeros(0)
        self.temperature = 1.0
        self.shift = np.zeros(0, dtype=np.float32)
        self.scale = np.ones(0, dtype=np.float32)
        self.module: nn.Module | None = None
        self.scorer: MahalanobisScorer | None = None
        self.knn: KNNScorer | None = None

    @abstractmethod
    def _build(self, dim: int, n_classes: int) -> nn.Module:
        """A fresh module mapping ``[n, dim]`` to ``[n, n_classes]`` logits."""

    @abstractmethod
    def _train(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
        """Fit ``self.module`` on standardised inputs, class indices and per-class weights."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> Self:
        """Train on embeddings ``x`` and labels ``y``; resets the temperature to 1."""
        self.classes_, index = np.unique(np.asarray(y), return_inverse=True)
        x = np.asarray(x, dtype=np.float32)
        self.shift = x.mean(axis=0)
        self.scale = x.std(axis=0) + 1e-6
        z = self._standardise(x)
        k = len(self.classes_)
        weights = (
            balanced_weights(index, k) if self.config["class_weight"] == "balanced" else np.ones(k)
        )
        torch.manual_seed(self.config["seed"])
        self.module = self._build(x.shape[1], k)
        self.module.train()
        self._train(
            torch.from_numpy(z),
            torch.from_numpy(index.astype(np.int64)),
            torch.tensor(weights, dtype=torch.float32),
        )
        self.module.eval()
        self.scorer = MahalanobisScorer.fit(z, index, k)
        self.knn = KNNScorer.fit(z)
        self.temperature = 1.0
        return self

    def calibrate(self, x: np.ndarray, y: np.ndarray) -> float:
        """Fit the temperature on held-out embeddings and labels (never the training rows)."""
        index = np.searchsorted(self.classes_, np.asarray(y))
        self.temperature = fit_temperature(self.logits(x), index)
        return self.temperature

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``[n, n_classes]`` uncalibrated logits."""
        if self.module is None:
            raise RuntimeError("fit or load the head first")
        with torch.no_grad():
            out = self.module(torch.from_numpy(self._standardise(np.asarray(x, np.float32))))
        return out.numpy().astype(np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, columns in ``classes_`` order."""
        return softmax(self.logits(x), self.temperature)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.logits(x).argmax(axis=1)]

    def ood_score(self, x: np.ndarray, method: OODMethod = DEFAULT_METHOD) -> np.ndarray:
        """``[n]`` out-of-distribution score; higher is less like the training users.

        ``knn`` (the default) and ``mahalanobis`` measure the standardised embedding against the
        training users and the class means; ``energy`` reads the logits (see
        :mod:`downstream_adapters.heads.ood`). A head file saved before ``knn`` existed refuses
        it with a message pointing to ``mahalanobis``, rather than switching scores silently.
        """
        check_method(method)
        if method == "energy":
            return energy(self.logits(x), self.temperature)
        if self.scorer is None:
            raise RuntimeError("fit or load the head first")
        z = self._standardise(np.asarray(x, np.float32))
        if method == "knn":
            return require_knn(self.knn).score(z)
        return self.scorer.score(z)

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(json-able config, named arrays)``: everything :meth:`from_state` needs."""
        if self.module is None or self.scorer is None:
            raise RuntimeError("fit the head before saving it")
        arrays = {f"module.{k}": v.detach().numpy() for k, v in self.module.state_dict().items()}
        arrays.update({f"ood.{k}": v for k, v in self.scorer.arrays().items()})
        if self.knn is not None:
            arrays.update({f"ood.knn_{k}": v for k, v in self.knn.arrays().items()})
        arrays.update(classes=self.classes_, shift=self.shift, scale=self.scale)
        config = {"kind": self.kind, "config": self.config, "temperature": self.temperature}
        return config, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        head = cls(**config["config"])
        head.classes_ = arrays["classes"]
        head.shift, head.scale = arrays["shift"], arrays["scale"]
        head.temperature = float(config["temperature"])
        head.scorer = MahalanobisScorer(arrays["ood.means"], arrays["ood.precision"])
        head.knn = KNNScorer.from_arrays(arrays, "ood.knn_")
        head.module = head._build(len(head.shift), len(head.classes_))
        module_state = {
            k.removeprefix("module."): torch.from_numpy(np.array(v))
            for k, v in arrays.items()
            if k.startswith("module.")
        }
        # The support set of the few-shot heads is a buffer whose size is known only now.
        for name, _ in list(head.module.named_buffers(recurse=False)):
            head.module.register_buffer(name, module_state[name])
        head.module.load_state_dict(module_state)
        head.module.eval()
        return head


def train_minibatch(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int = 256,
) -> None:
    """Weighted cross-entropy with Adam over shuffled minibatches (the seed is set by ``fit``)."""
    optimiser = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            rows = order[start : start + batch_size]
            optimiser.zero_grad()
            loss_fn(module(x[rows]), y[rows]).backward()
            optimiser.step()
