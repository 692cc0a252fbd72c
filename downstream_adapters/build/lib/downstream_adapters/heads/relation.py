"""Relation network (Sung et al., 2018), the profiling paper's second few-shot head.

Instead of a fixed similarity, a learned relation module scores each (query, class) pair from
the query's features and the class prototype (the mean features of the class's support users),
fed as ``[q, c, |q - c|, q * c]``. The scores are trained with cross-entropy over classes (the
original regresses them to 0/1 with MSE; cross-entropy gives logits that temperature scaling
can calibrate).
"""

from __future__ import annotations

import torch
from torch import nn

from downstream_adapters.heads.base import ClassifierHead
from downstream_adapters.heads.episodes import support_subset, train_episodic


class _Relation(nn.Module):
    def __init__(self, dim: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.relation = nn.Sequential(
            nn.Linear(4 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        self.n_classes = n_classes
        self.register_buffer("support", torch.zeros(0, dim))
        self.register_buffer("support_y", torch.zeros(0, dtype=torch.long))

    def episode_logits(
        self, query: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor, n_classes: int
    ) -> torch.Tensor:
        one_hot = nn.functional.one_hot(support_y, n_classes).float()
        counts = one_hot.sum(dim=0)
        prototypes = (one_hot.T @ self.features(support)) / counts.clamp(min=1)[:, None]
        q = self.features(query)[:, None, :].expand(-1, n_classes, -1)
        c = prototypes[None, :, :].expand(len(query), -1, -1)
        scores = self.relation(torch.cat([q, c, (q - c).abs(), q * c], dim=2)).squeeze(2)
        # A class absent from the support cannot be predicted.
        return scores.masked_fill(counts[None, :] == 0, -1e4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.episode_logits(x, self.support, self.support_y, self.n_classes)


class RelationHead(ClassifierHead):
    """Few-shot classifier scoring queries against stored class prototypes."""

    kind = "relation"

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

    def _build(self, dim: int, n_classes: int) -> nn.Module:
        return _Relation(dim, self.config["hidden"], n_classes)

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
