"""Coarse sample selection: keep the source samples whose user and item sit near the target domain.

The entire space is one graph: users and items are nodes, an interaction is a user-item edge and
(where the data has one) a trust or follow relation is a user-user edge. A random walk that
restarts at the target domain's nodes (personalised PageRank) visits nodes close to the target
more often than a walk restarting anywhere; the ratio of the two visit rates, the *lift*, says
how target-like a node is regardless of how popular it is. A source sample scores the geometric
mean of its user's and its item's lift. Numpy only: this module is part of the package core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InteractionGraph:
    """An undirected weighted graph over ``n_users`` user nodes followed by ``n_items`` item nodes.

    Build it with :meth:`from_interactions`; ``src``/``dst``/``weight`` hold every edge in both
    directions, so a walk can move user -> item -> user.
    """

    n_users: int
    n_items: int
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray

    @classmethod
    def from_interactions(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        n_users: int,
        n_items: int,
        *,
        social: tuple[np.ndarray, np.ndarray] | None = None,
        social_weight: float = 1.0,
    ) -> InteractionGraph:
        """Edges from interactions (dense user and item indices) and optional user-user pairs.

        Repeated pairs add up. ``social_weight`` scales the user-user edges against the
        interaction edges: trust is a weaker (or stronger) sign of shared taste than co-rating.
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64) + n_users
        parts_src, parts_dst, parts_w = [users, items], [items, users], [np.ones(2 * len(users))]
        if social is not None:
            a, b = (np.asarray(s, dtype=np.int64) for s in social)
            keep = a != b
            a, b = a[keep], b[keep]
            parts_src += [a, b]
            parts_dst += [b, a]
            parts_w.append(np.full(2 * len(a), float(social_weight)))
        return cls(
            n_users,
            n_items,
            np.concatenate(parts_src),
            np.concatenate(parts_dst),
            np.concatenate(parts_w),
        )

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    def degree(self) -> np.ndarray:
        """Weighted degree of every node (users first)."""
        return np.bincount(self.src, weights=self.weight, minlength=self.n_nodes)


def personalized_pagerank(
    graph: InteractionGraph,
    restart: np.ndarray,
    *,
    alpha: float = 0.15,
    iterations: int = 50,
    tol: float = 1e-10,
) -> np.ndarray:
    """Visit probability of a walk that restarts with probability ``alpha`` at ``restart``.

    ``restart`` is any non-negative vector over the nodes (normalised here). A node without
    edges sends its mass back to the restart distribution, so the result sums to one.
    """
    s = np.asarray(restart, dtype=np.float64)
    if s.shape != (graph.n_nodes,) or (s < 0).any() or s.sum() <= 0:
        raise ValueError("restart must be a non-negative, non-zero vector over the graph's nodes")
    s = s / s.sum()
    degree = graph.degree()
    share = graph.weight / degree[graph.src]
    dangling = degree == 0
    p = s.copy()
    for _ in range(iterations):
        moved = np.bincount(graph.dst, weights=p[graph.src] * share, minlength=graph.n_nodes)
        nxt = alpha * s + (1 - alpha) * (moved + p[dangling].sum() * s)
        done = np.abs(nxt - p).sum() < tol
        p = nxt
        if done:
            break
    return p


def node_lift(
    graph: InteractionGraph,
    target_users: np.ndarray,
    target_items: np.ndarray,
    *,
    alpha: float = 0.15,
) -> np.ndarray:
    """How much more a walk restarting in the target domain visits each node than a neutral walk.

    The target walk restarts at the target's users and items in proportion to how often they
    appear in target samples; the neutral walk restarts at every node in proportion to its degree.
    A lift above 1 means "closer to the target than to the entire space".
    """
    restart = np.bincount(target_users, minlength=graph.n_users).astype(np.float64)
    restart = np.concatenate([restart, np.bincount(target_items, minlength=graph.n_items)])
    near = personalized_pagerank(graph, restart, alpha=alpha)
    degree = graph.degree()
    neutral = personalized_pagerank(graph, degree + (degree == 0), alpha=alpha)
    return near / np.maximum(neutral, 1e-300)


def sample_scores(
    graph: InteractionGraph,
    lift: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
) -> np.ndarray:
    """``sqrt(lift(user) * lift(item))`` per sample: high only when both ends are target-like."""
    u = lift[np.asarray(users, dtype=np.int64)]
    i = lift[np.asarray(items, dtype=np.int64) + graph.n_users]
    return np.sqrt(u * i)


def coarse_select(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Boolean mask keeping the ``keep_fraction`` highest-scoring samples.

    Ties at the threshold are kept together, but a sample scoring 0 (a node no walk from the
    target reaches) is never kept, so fewer than ``keep_fraction`` may survive.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError("keep_fraction must be in (0, 1]")
    scores = np.asarray(scores)
    if len(scores) == 0:
        return np.ones(0, dtype=bool)
    threshold = np.quantile(scores, 1 - keep_fraction)
    return (scores >= threshold) & (scores > 0)
