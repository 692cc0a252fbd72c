"""The adapter's model selection (keep fraction, distillation strength) on planted worlds.

A source that follows the target's rule is worth keeping whole; a source half of which follows
the opposite rule is worth cutting to the half the graph ranks close to the target. The selection
only sees the target's validation split, so these are the answers it must find there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from downstream_adapters.crossdomain import CrossDomainAdapter, DomainSamples, InteractionGraph

from tests.adapters.crossdomain_synth import World, make_world

NETWORK = {"max_steps": 400, "eval_every": 25, "patience": 6, "hidden": 32}
# the graph cut alone is under test: no domain weights, no teacher
CUT_ONLY = {"fine": False, "distill": "none", **NETWORK}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _fit_inputs(world: World, n_train: int) -> tuple[DomainSamples, DomainSamples, np.ndarray]:
    train = np.flatnonzero(world.domain == 0)[:n_train]
    source = np.flatnonzero(world.domain > 0)

    def samples(rows: np.ndarray) -> DomainSamples:
        return DomainSamples(world.x[rows], world.y[rows], world.users[rows], world.items[rows])

    return samples(train), samples(source), np.concatenate([train, source])


def _connected_graph(world: World, rows: np.ndarray, seed: int) -> InteractionGraph:
    """The samples' graph plus a few random user-item edges, so every node is reachable.

    Without them the unrelated community is a separate component that the graph cut drops
    even at keep fraction 1 (no walk from the target reaches it).
    """
    rng = np.random.default_rng(seed)
    users = np.concatenate([world.users[rows], rng.integers(0, world.n_users, 300)])
    items = np.concatenate([world.items[rows], rng.integers(0, world.n_items, 300)])
    return InteractionGraph.from_interactions(users, items, world.n_users, world.n_items)


def _by_keep(adapter: CrossDomainAdapter) -> dict[float, float]:
    return {c.keep_fraction: c.val_loss for c in adapter.search}


def test_a_source_that_follows_the_target_is_kept_whole() -> None:
    world = make_world(seed=11, n_target=700, n_related=3000, n_unrelated=0)
    target, source, rows = _fit_inputs(world, n_train=500)
    adapter = CrossDomainAdapter(**CUT_ONLY).fit(target, source, graph=world.graph(rows))

    assert adapter.chosen == {"keep_fraction": 1.0, "strength": 0.0, "from_teacher": True}
    losses = _by_keep(adapter)
    assert sorted(losses) == [0.0, 0.25, 0.5, 1.0]
    assert losses[1.0] < losses[0.0]  # the source helps: more of it, lower validation loss
    assert adapter.selection is not None and adapter.selection.kept.mean() > 0.95


def test_a_half_harmful_source_is_cut_to_the_half_near_the_target() -> None:
    world = make_world(seed=12, n_target=700, n_related=2500, n_unrelated=2500)
    target, source, rows = _fit_inputs(world, n_train=500)
    graph = _connected_graph(world, rows, seed=12)
    adapter = CrossDomainAdapter(**CUT_ONLY).fit(target, source, graph=graph)

    losses = _by_keep(adapter)
    chosen = adapter.chosen["keep_fraction"]
    assert 0 < chosen < 1.0
    assert losses[chosen] < losses[1.0] - 0.05  # keeping the harmful half costs real loss
    assert adapter.selection is not None
    harmful = world.domain[world.domain > 0] == 2
    assert adapter.selection.kept[harmful].mean() < 0.05
    keep_all = next(c for c in adapter.search if c.keep_fraction == 1.0)
    assert keep_all.selection.kept[harmful].mean() > 0.95
    # the student the adapter serves is the chosen candidate's
    best = min(adapter.search, key=lambda c: c.val_loss)
    assert adapter.student is best.student


def test_an_entire_space_that_misleads_the_target_falls_back_to_the_target_alone() -> None:
    # every source sample follows the opposite rule, so the teacher learns the wrong one
    world = make_world(seed=16, n_target=700, n_related=0, n_unrelated=4000)
    target, source, _ = _fit_inputs(world, n_train=500)
    adapter = CrossDomainAdapter(coarse=False, fine=False, **NETWORK).fit(target, source)

    assert adapter.chosen["from_teacher"] is False
    fallback = adapter.search[-1]
    assert not fallback.from_teacher
    assert fallback.val_loss < min(c.val_loss for c in adapter.search[:-1]) - 0.05
    test = np.flatnonzero(world.domain == 0)[500:]
    teacher = adapter.teacher
    assert teacher is not None
    y = world.y[test]
    adapter_p, teacher_p = (
        adapter.predict_proba(world.x[test]),
        teacher.predict_proba(world.x[test]),
    )
    assert np.mean((adapter_p > 0.5) == y) > np.mean((teacher_p > 0.5) == y) + 0.2


def test_strength_is_chosen_and_update_reuses_the_choice() -> None:
    world = make_world(seed=13, n_related=600, n_unrelated=600)
    target, source, _ = _fit_inputs(world, n_train=300)
    adapter = CrossDomainAdapter(coarse=False, update_steps=20, **NETWORK)
    adapter.fit(target, source)

    # without the graph only "no source" and "all of it" can be tried, each with both lambdas,
    # and the target alone on a fresh network
    assert [(c.keep_fraction, c.strength, c.from_teacher) for c in adapter.search] == [
        (0.0, 0.0, True),
        (0.0, 1.0, True),
        (1.0, 0.0, True),
        (1.0, 1.0, True),
        (0.0, 0.0, False),
    ]
    chosen = dict(adapter.chosen)
    adapter.update(target.take(np.arange(200)), source)
    assert adapter.chosen == chosen
    assert [(c.keep_fraction, c.strength, c.from_teacher) for c in adapter.search] == [
        (chosen["keep_fraction"], chosen["strength"], chosen["from_teacher"])
    ]


def test_fixed_values_train_one_student() -> None:
    world = make_world(seed=14, n_related=300, n_unrelated=300)
    target, source, rows = _fit_inputs(world, n_train=300)
    adapter = CrossDomainAdapter(keep_fraction=0.5, strength=1.0, **NETWORK)
    adapter.fit(target, source, graph=world.graph(rows))
    assert len(adapter.search) == 1
    assert adapter.chosen == {"keep_fraction": 0.5, "strength": 1.0, "from_teacher": True}


def test_select_before_fit_needs_a_keep_fraction_and_bad_values_are_refused() -> None:
    world = make_world(seed=15, n_related=100, n_unrelated=100)
    target, source, rows = _fit_inputs(world, n_train=100)
    with pytest.raises(RuntimeError, match="keep_fraction"):
        CrossDomainAdapter().select(target, source, world.graph(rows))
    selection = CrossDomainAdapter().select(target, source, world.graph(rows), keep_fraction=0.5)
    assert selection.stats["coarse_kept"] <= 0.5 * len(source) + 1
    with pytest.raises(ValueError, match="keep fractions"):
        CrossDomainAdapter(keep_candidates=(0.5, 1.5))
    with pytest.raises(ValueError, match="strengths"):
        CrossDomainAdapter(strength=-1.0)
