"""Episodic training for the few-shot heads: each step is a small classification problem.

An episode draws, per class, a few support users and a few query users; the head classifies the
queries using only that support, as it will at prediction time with the stored support set.
With one labelled user in a class the query is that user itself: queries are always perturbed
(Gaussian noise and feature dropout) so the head cannot learn to match a row to its own copy.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn


class EpisodicModule(Protocol):
    def episode_logits(
        self, query: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor, n_classes: int
    ) -> torch.Tensor: ...


def sample_episode(
    y: np.ndarray, n_classes: int, shots: int, queries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(support, query)``; classes with one user use it for both."""
    support: list[np.ndarray] = []
    query: list[np.ndarray] = []
    for c in range(n_classes):
        rows = rng.permutation(np.flatnonzero(y == c))
        if len(rows) == 0:
            continue
        if len(rows) == 1:
            support.append(rows)
            query.append(rows)
            continue
        n_query = min(queries, len(rows) - 1)
        query.append(rows[:n_query])
        support.append(rows[n_query : n_query + shots])
    return np.concatenate(support), np.concatenate(query)


def perturb(x: torch.Tensor, noise: float) -> torch.Tensor:
    keep = (torch.rand_like(x) > noise).float() / (1 - noise)
    return x * keep + noise * torch.randn_like(x)


def train_episodic(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    episodes: int,
    shots: int,
    queries: int,
    lr: float,
    weight_decay: float,
    noise: float,
    seed: int,
) -> None:
    """Weighted cross-entropy of query logits, one Adam step per episode."""
    rng = np.random.default_rng(seed)
    n_classes = len(weights)
    labels = y.numpy()
    optimiser = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    episodic: EpisodicModule = module  # type: ignore[assignment]
    for _ in range(episodes):
        support, query = sample_episode(labels, n_classes, shots, queries, rng)
        logits = episodic.episode_logits(
            perturb(x[query], noise), x[support], y[support], n_classes
        )
        optimiser.zero_grad()
        loss_fn(logits, y[query]).backward()
        optimiser.step()


def support_subset(y: np.ndarray, n_classes: int, per_class: int, seed: int) -> np.ndarray:
    """At most ``per_class`` rows of each class: the support set kept for prediction."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(n_classes)]
    return np.sort(np.concatenate(rows))
