"""The linear probe: multinomial logistic regression on standardised embeddings.

The probe measures what the embedding holds linearly; it is the head to try first and the one
the evaluation compares against the raw-feature baselines.
"""

from __future__ import annotations

import torch
from torch import nn

from downstream_adapters.heads.base import ClassifierHead, train_minibatch


class LinearHead(ClassifierHead):
    """Logistic regression; ``l2`` is the weight decay (stronger for fewer labelled users)."""

    kind = "linear"

    def __init__(self, *, l2: float = 1e-3, epochs: int = 100, lr: float = 0.01, **base: object):
        super().__init__(l2=l2, epochs=epochs, lr=lr, **base)  # type: ignore[arg-type]

    def _build(self, dim: int, n_classes: int) -> nn.Module:
        return nn.Linear(dim, n_classes)

    def _train(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
        assert self.module is not None
        c = self.config
        train_minibatch(
            self.module, x, y, weights, epochs=c["epochs"], lr=c["lr"], weight_decay=c["l2"]
        )
