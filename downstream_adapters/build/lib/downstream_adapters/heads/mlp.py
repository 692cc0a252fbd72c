"""A one-hidden-layer MLP probe, for tasks the embedding encodes non-linearly."""

from __future__ import annotations

import torch
from torch import nn

from downstream_adapters.heads.base import ClassifierHead, train_minibatch


class MLPHead(ClassifierHead):
    """``Linear -> ReLU -> Dropout -> Linear``; ``hidden`` units, ``l2`` weight decay."""

    kind = "mlp"

    def __init__(
        self,
        *,
        hidden: int = 64,
        dropout: float = 0.3,
        l2: float = 1e-3,
        epochs: int = 60,
        lr: float = 3e-3,
        **base: object,
    ) -> None:
        super().__init__(  # type: ignore[arg-type]
            hidden=hidden, dropout=dropout, l2=l2, epochs=epochs, lr=lr, **base
        )

    def _build(self, dim: int, n_classes: int) -> nn.Module:
        c = self.config
        return nn.Sequential(
            nn.Linear(dim, c["hidden"]),
            nn.ReLU(),
            nn.Dropout(c["dropout"]),
            nn.Linear(c["hidden"], n_classes),
        )

    def _train(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
        assert self.module is not None
        c = self.config
        train_minibatch(
            self.module, x, y, weights, epochs=c["epochs"], lr=c["lr"], weight_decay=c["l2"]
        )
