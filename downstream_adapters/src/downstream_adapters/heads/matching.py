"""Matching network (Vinyals et al., 2016), as the profiling paper uses it for few-shot tasks.

A query's class distribution is attention over a labelled support set: a softmax of scaled
cosine similarities between learned embeddings of the query and of each support user, summed
per class. The embedding function is residual and starts as the identity, so an untrained
head is cosine nearest-neighbours on the embedding and episodic training only refines it; that
matters with one or five labelled users per class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from downstream_adapters.heads.episodic_head import EpisodicHead


class _Matching(nn.Module):
    def __init__(self, dim: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.hidden[2].weight)
        nn.init.zeros_(self.hidden[2].bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.n_classes = n_classes
        self.register_buffer("support", torch.zeros(0, dim))
        self.register_buffer("support_y", torch.zeros(0, dtype=torch.long))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x + self.hidden(x), dim=1)

    def episode_logits(
        self, query: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor, n_classes: int
    ) -> torch.Tensor:
        attention = torch.softmax(
            self.log_scale.exp() * self.embed(query) @ self.embed(support).T, dim=1
        )
        one_hot = nn.functional.one_hot(support_y, n_classes).float()
        return torch.log(attention @ one_hot + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.episode_logits(x, self.support, self.support_y, self.n_classes)


class MatchingHead(EpisodicHead):
    """Few-shot classifier by attention over up to ``max_support`` stored users per class."""

    kind = "matching"

    def _build(self, dim: int, n_classes: int) -> nn.Module:
        return _Matching(dim, self.config["hidden"], n_classes)
