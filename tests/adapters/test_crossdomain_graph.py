"""Coarse selection on the interaction graph: planted related samples must survive it."""

from __future__ import annotations

import numpy as np
import pytest
from downstream_adapters.crossdomain.graph import (
    InteractionGraph,
    coarse_select,
    node_lift,
    personalized_pagerank,
    sample_scores,
)

from tests.adapters.crossdomain_synth import make_world


def test_pagerank_is_a_distribution_concentrated_near_the_restart() -> None:
    # two disconnected stars: user 0 with items 0-2, user 1 with items 3-5
    graph = InteractionGraph.from_interactions(
        np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 3, 4, 5]), 2, 6
    )
    restart = np.zeros(graph.n_nodes)
    restart[0] = 1.0
    p = personalized_pagerank(graph, restart)
    assert p.sum() == pytest.approx(1.0)
    assert p[[1, 5, 6, 7]].sum() == pytest.approx(0.0)  # user 1 and its items are unreachable
    assert p[0] > p[2] == pytest.approx(p[3])  # the restart node first, its items alike


def test_pagerank_refuses_a_restart_vector_of_the_wrong_shape() -> None:
    graph = InteractionGraph.from_interactions(np.array([0]), np.array([0]), 1, 1)
    with pytest.raises(ValueError, match="restart"):
        personalized_pagerank(graph, np.zeros(2))


def test_graph_selection_keeps_the_planted_related_samples() -> None:
    world = make_world(seed=1)
    target = np.flatnonzero(world.domain == 0)[:200]
    source = np.flatnonzero(world.domain > 0)
    graph = world.graph(np.concatenate([target, source]))
    lift = node_lift(graph, world.users[target], world.items[target])
    scores = sample_scores(graph, lift, world.users[source], world.items[source])
    related = world.domain[source] == 1
    # every related sample outscores every unrelated one: they share the target's users
    assert scores[related].min() > scores[~related].max()
    kept = coarse_select(scores, keep_fraction=0.5)
    assert kept[related].mean() > 0.99
    assert kept[~related].mean() < 0.01


def test_trust_edges_bring_in_users_known_only_socially() -> None:
    # user 0 rates the target item 0; user 1 never co-rates with user 0 but trusts them
    users, items = np.array([0, 1, 2]), np.array([0, 1, 2])
    plain = InteractionGraph.from_interactions(users, items, 3, 3)
    social = InteractionGraph.from_interactions(
        users, items, 3, 3, social=(np.array([1]), np.array([0]))
    )
    target_users, target_items = np.array([0]), np.array([0])
    assert node_lift(plain, target_users, target_items)[1] == 0.0
    lift = node_lift(social, target_users, target_items)
    assert lift[1] > lift[2] == 0.0  # user 2 stays unreachable


def test_coarse_select_keeps_the_top_share_but_never_unreachable_samples() -> None:
    scores = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert coarse_select(scores, 0.25).tolist() == [False] * 6 + [True] * 2
    # half the samples would include a tie at 0, which is unreachable: it stays out
    assert coarse_select(scores, 0.75).sum() == 5
    with pytest.raises(ValueError, match="keep_fraction"):
        coarse_select(scores, 0.0)
