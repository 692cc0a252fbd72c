"""What the matching and relation heads share: episodic training and a stored support set."""

from __future__ import annotations

import torch

from downstream_adapters.heads.base import ClassifierHead
from downstream_adapters.heads.episodes import support_subset, train_episodic


class EpisodicHead(ClassifierHead):
    """A few-shot head trained on episodes that keeps up to ``max_support`` users per class.

    Subclasses name their ``kind`` and build the module scoring queries against the support.
    """

    def __init__(
        self,
        *,
        hidden: int = 64,
        episodes: int = 300,
        shots: int = 5,
        queries: int = 5,
        lr: float = 1e-3,
        l2: float = 1e-4,
        noise: float = 0.1,
        max_support: int = 100,
        **base: object,
    ) -> None:
        super().__init__(  # type: ignore[arg-type]
            hidden=hidden,
            episodes=episodes,
            shots=shots,
            queries=queries,
            lr=lr,
            l2=l2,
            noise=noise,
            max_support=max_support,
            **base,
        )

    def _train(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
        assert self.module is not None
        c = self.config
        train_episodic(
            self.module,
            x,
            y,
            weights,
            episodes=c["episodes"],
            shots=c["shots"],
            queries=c["queries"],
            lr=c["lr"],
            weight_decay=c["l2"],
            noise=c["noise"],
            seed=c["seed"],
        )
        rows = torch.from_numpy(
            support_subset(y.numpy(), len(weights), c["max_support"], c["seed"])
        )
        self.module.support = x[rows].clone()
        self.module.support_y = y[rows].clone()
