"""The heads' OOD scores on synthetic embeddings: what each flags, and that it survives saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from downstream_adapters.artifact import load, save
from downstream_adapters.heads import HEADS, LinearHead, MultiTaskHead
from downstream_adapters.heads.ood import MAX_REFERENCE, NEIGHBOURS, KNNScorer

from downstream_adapters import Pin

from .test_heads import auroc, clusters


def _direct_kth_distance(reference: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The k-th nearest distance from the full query x reference matrix, by broadcasting."""
    full = np.linalg.norm(queries[:, None, :] - reference[None, :, :].astype(np.float64), axis=2)
    return np.sort(full, axis=1)[:, k - 1]


def test_knn_flags_shifted_users_and_a_far_cluster_but_not_fresh_draws() -> None:
    x, _ = clusters(1400)
    knn = KNNScorer.fit(x[:800])
    assert knn.k == NEIGHBOURS
    inside = knn.score(x[800:1100])
    assert 0.4 < auroc(inside, knn.score(x[1100:])) < 0.6  # held-out draws of the same users
    shifted = x[1100:] + 1.5  # every coordinate moved by 1.5 standard deviations of the noise
    assert auroc(inside, knn.score(shifted)) > 0.95
    far = x[1100:] * 3 + 6
    assert auroc(inside, knn.score(far)) == 1.0


def test_chunked_scoring_equals_the_direct_computation() -> None:
    x, _ = clusters(600, seed=2)
    knn = KNNScorer.fit(x[:400])
    queries = x[400:]
    direct = _direct_kth_distance(knn.reference, queries, knn.k)
    # 7 queries x 400 references per block: 29 blocks, the last one short.
    np.testing.assert_allclose(
        knn.score(queries, chunk_cells=7 * 400), direct, rtol=1e-9, atol=1e-6
    )
    np.testing.assert_allclose(knn.score(queries), direct, rtol=1e-9, atol=1e-6)
    # A training user scored against a bank holding it: zero distance to itself, so the k-th
    # nearest is its (k-1)-th other neighbour; the clip keeps rounding from going negative.
    assert (knn.score(x[:50], chunk_cells=1) >= 0).all()


def test_the_reference_bank_is_a_bounded_seeded_subsample() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    small = KNNScorer.fit(x, max_rows=300)
    assert small.reference.shape == (300, 8)
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in small.reference)  # real training rows, not made up
    np.testing.assert_array_equal(KNNScorer.fit(x, max_rows=300).reference, small.reference)
    assert KNNScorer.fit(x).reference.shape == (1000, 8)  # under the default bound: all kept
    assert MAX_REFERENCE == 5000
    big = KNNScorer.fit(np.zeros((MAX_REFERENCE + 10, 2), np.float32))
    assert big.reference.shape == (MAX_REFERENCE, 2)


def test_k_is_capped_at_one_less_than_the_bank() -> None:
    x, _ = clusters(4)
    knn = KNNScorer.fit(x)
    assert knn.k == 3
    np.testing.assert_allclose(knn.score(x[:2] + 0.1), _direct_kth_distance(x, x[:2] + 0.1, 3))
    assert KNNScorer.fit(x[:1]).k == 1


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_scores_with_each_method_and_round_trips(kind: str, tmp_path: Path) -> None:
    x, y = clusters(700)
    head = HEADS[kind]().fit(x[:500], y[:500])
    far = x[500:] * 3 + 6
    for method in ("knn", "mahalanobis"):
        assert auroc(head.ood_score(x[500:], method), head.ood_score(far, method)) > 0.95
    np.testing.assert_array_equal(head.ood_score(x[500:]), head.ood_score(x[500:], "knn"))
    loaded = load(save(tmp_path / kind, head, Pin("v1", 16, "h"))).head
    for method in ("knn", "mahalanobis", "energy"):
        np.testing.assert_allclose(
            loaded.ood_score(x[500:], method), head.ood_score(x[500:], method)
        )


def test_multitask_head_scores_each_task_and_round_trips(tmp_path: Path) -> None:
    x, y = clusters(700)
    parity = (x[:, 0] > 0).astype(int)
    head = MultiTaskHead(epochs=5).fit(x[:500], {"cluster": y[:500], "sign": parity[:500]})
    far = x[500:] * 3 + 6
    for task in ("cluster", "sign"):
        for method in ("knn", "mahalanobis"):
            inside, outside = (
                head.ood_score(x[500:], task, method),
                head.ood_score(far, task, method),
            )
            assert auroc(inside, outside) > 0.95
    # One label-free bank serves every task.
    np.testing.assert_array_equal(head.ood_score(far, "cluster"), head.ood_score(far, "sign"))
    loaded = load(save(tmp_path / "mt", head, Pin("v1", 16, "h"))).head
    for task in ("cluster", "sign"):
        for method in ("knn", "mahalanobis", "energy"):
            np.testing.assert_allclose(
                loaded.ood_score(x[500:], task, method), head.ood_score(x[500:], task, method)
            )


def test_an_unknown_method_is_refused_by_name() -> None:
    x, y = clusters(200)
    head = LinearHead(epochs=2).fit(x, y)
    with pytest.raises(ValueError, match="unknown OOD method 'minor': use one of knn, mahalanobis"):
        head.ood_score(x[:3], "minor")  # type: ignore[arg-type]
    multitask = MultiTaskHead(epochs=2).fit(x, {"cluster": y})
    with pytest.raises(ValueError, match="unknown OOD method"):
        multitask.ood_score(x[:3], "cluster", "KNN")  # type: ignore[arg-type]


class _SavedBeforeKNN:
    """A fitted head as a file written before the kNN score existed would hold it."""

    def __init__(self, head: LinearHead | MultiTaskHead) -> None:
        self.kind = head.kind
        self.head = head

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config, arrays = self.head.state()
        return config, {k: v for k, v in arrays.items() if not k.startswith("ood.knn_")}


def test_a_head_saved_before_knn_scores_mahalanobis_and_refuses_knn_by_name(
    tmp_path: Path,
) -> None:
    x, y = clusters(300)
    message = r"OOD method 'knn' \(the default\).*method='mahalanobis'\) or refit the head"
    head = LinearHead(epochs=5).fit(x, y)
    loaded = load(save(tmp_path / "old", _SavedBeforeKNN(head), Pin("v1", 16, "h"))).head
    assert loaded.knn is None
    np.testing.assert_allclose(
        loaded.ood_score(x[:5], "mahalanobis"), head.ood_score(x[:5], "mahalanobis")
    )
    with pytest.raises(RuntimeError, match=message):
        loaded.ood_score(x[:5])
    with pytest.raises(RuntimeError, match=message):
        loaded.ood_score(x[:5], "knn")

    multitask = MultiTaskHead(epochs=2).fit(x, {"cluster": y})
    saved = save(tmp_path / "old-mt", _SavedBeforeKNN(multitask), Pin("v1", 16, "h"))
    old_multitask = load(saved).head
    np.testing.assert_allclose(
        old_multitask.ood_score(x[:5], "cluster", "mahalanobis"),
        multitask.ood_score(x[:5], "cluster", "mahalanobis"),
    )
    with pytest.raises(RuntimeError, match=message):
        old_multitask.ood_score(x[:5], "cluster")
