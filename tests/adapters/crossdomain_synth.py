"""A small multi-domain world with a planted answer, for the cross-domain adapter's tests.

Users fall into two communities of equal feature distribution. The target domain and a *related*
source domain are used by community A and share the target's labelling rule; an *unrelated*
source domain, larger, is used by community B and follows the opposite rule. So the graph can
find the related samples (they share users with the target) while features alone cannot, and
merging every source sample naively teaches the student the wrong rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from downstream_adapters.crossdomain.graph import InteractionGraph

DIM = 4


@dataclass
class World:
    x: np.ndarray
    y: np.ndarray
    users: np.ndarray
    items: np.ndarray
    domain: np.ndarray  # 0 target, 1 related source, 2 unrelated source
    n_users: int
    n_items: int

    def graph(self, rows: np.ndarray) -> InteractionGraph:
        return InteractionGraph.from_interactions(
            self.users[rows], self.items[rows], self.n_users, self.n_items
        )


def make_world(
    seed: int = 0,
    *,
    n_users: int = 400,
    items_per_domain: int = 150,
    n_target: int = 700,
    n_related: int = 2500,
    n_unrelated: int = 5000,
) -> World:
    """Samples ``x = [user taste + noise, item vector + noise, taste * item]`` and 0/1 labels."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(n_users, DIM))
    community_a = np.arange(n_users) < n_users // 2
    item_vec = rng.normal(size=(3 * items_per_domain, DIM))
    parts = []
    for domain, n, sign in ((0, n_target, 1.0), (1, n_related, 1.0), (2, n_unrelated, -1.0)):
        pool = np.flatnonzero(community_a if domain < 2 else ~community_a)
        u = rng.choice(pool, size=n)
        i = domain * items_per_domain + rng.integers(0, items_per_domain, size=n)
        affinity = sign * (taste[u] * item_vec[i]).sum(axis=1)
        y = (rng.random(n) < 1 / (1 + np.exp(-2.0 * affinity))).astype(np.float32)
        x = np.concatenate(
            [
                taste[u] + 0.3 * rng.normal(size=(n, DIM)),
                item_vec[i] + 0.3 * rng.normal(size=(n, DIM)),
                taste[u] * item_vec[i],
            ],
            axis=1,
        )
        parts.append((x, y, u, i, np.full(n, domain)))
    x, y, users, items, domain = (np.concatenate(p) for p in zip(*parts, strict=True))
    return World(x.astype(np.float32), y, users, items, domain, n_users, 3 * items_per_domain)
