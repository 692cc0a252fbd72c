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

from downstream_adapters.heads.episodic_head import EpisodicHead


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


class RelationHead(EpisodicHead):
    """Few-shot classifier scoring queries against stored class prototypes."""

    kind = "relation"

    def _build(self, dim: int, n_classes: int) -> nn.Module:
        return _Relation(dim, self.config["hidden"], n_classes)
