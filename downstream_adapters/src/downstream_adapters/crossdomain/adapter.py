"""The cross-domain adapter: entire-space samples and knowledge for a small target domain.

One class does the whole recipe (after ECAT, SIGIR 2024) for a binary target task on (user,
item) samples described by a feature vector (the user's embedding next to item features):

1. **Coarse selection** (:mod:`.graph`): keep the ``keep_fraction`` of source samples whose user
   and item are closest to the target domain on the entire-space interaction graph.
2. **Fine selection** (:mod:`.domain`): a domain classifier's density ratio re-weights the kept
   source samples so that they look like target samples; those below ``min_weight`` go.
3. **Adaptive distillation** (:mod:`.distill`): the student learns from the target samples, the
   weighted source samples and an entire-space teacher, with a per-sample weight that trusts the
   teacher only where it fits the label better than the student.
4. **Model selection**: how much of the source to keep and how strongly to distil depend on the
   target (a source that mostly agrees with it is worth keeping whole, a partly harmful one is
   worth cutting), so by default the adapter fits one student per candidate ``(keep_fraction,
   strength)`` and keeps the one with the lowest validation log-loss. Log-loss rather than
   AUC: it is what early stopping already minimises, it is a proper score (a candidate cannot
   win by being over-confident), and on the few hundred samples a small domain validates on it
   varies smoothly where a rank AUC moves in coarse steps. The teacher and the graph scores are
   computed once and shared by every candidate; the domain classifier once per keep fraction.
   One more candidate, the target alone from a fresh network (no source, no teacher), guards
   against an entire space that misleads the target: every other candidate starts from the
   teacher's weights and could not unlearn them on a small target.
5. **Continual mode**: :meth:`CrossDomainAdapter.update` trains on a new period starting from
   the previous student (and teacher), with the values chosen at ``fit``, without retraining
   from scratch.

Samples are passed in time order: the last ``val_fraction`` of the target's samples is the
validation split that early stopping of every network, and the model selection, look at.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import numpy as np

from downstream_adapters.crossdomain.domain import DomainClassifier, importance_weights
from downstream_adapters.crossdomain.graph import (
    InteractionGraph,
    coarse_select,
    node_lift,
    sample_scores,
)
from downstream_adapters.crossdomain.model import BinaryMLP, Distillation

DistillMode = Literal["adaptive", "fixed", "none"]
Auto = Literal["auto"]


@dataclass
class DomainSamples:
    """Samples of one domain: features ``x [n, d]``, labels ``y [n]`` (0/1) and, for the graph
    selection, the dense user and item node index of each sample (as in the
    :class:`~.graph.InteractionGraph`)."""

    x: np.ndarray
    y: np.ndarray
    users: np.ndarray | None = None
    items: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.float32)
        if self.x.ndim != 2 or len(self.x) != len(self.y):
            raise ValueError("x must be [n, d] and y [n]")
        for name in ("users", "items"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.y):
                raise ValueError(f"{name} must have one entry per sample")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, rows: np.ndarray) -> DomainSamples:
        return DomainSamples(
            self.x[rows],
            self.y[rows],
            None if self.users is None else self.users[rows],
            None if self.items is None else self.items[rows],
        )


@dataclass
class Selection:
    """What the two selection stages did to the source samples (for reports and checks)."""

    n_source: int
    coarse_kept: np.ndarray
    weights: np.ndarray
    graph_scores: np.ndarray | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask over the source samples that the student trains on."""
        return self.weights > 0


@dataclass
class Candidate:
    """One student of the model selection: its settings, validation log-loss and selection.

    Every candidate's student is kept, so a caller can compare the alternatives the selection
    turned down (they are small networks).
    """

    keep_fraction: float
    strength: float
    from_teacher: bool
    val_loss: float
    selection: Selection
    student: BinaryMLP


class CrossDomainAdapter:
    """Train a target-domain model from its own samples plus the entire space's.

    Args:
        coarse: use the graph selection (needs ``graph`` and user/item indices in ``fit``).
        keep_fraction: share of source samples the graph selection keeps (0 keeps none: the
            student learns from the target and the teacher only), or ``"auto"``: the best of
            ``keep_candidates`` on the validation split. Without the graph selection only 0
            and 1 are possible.
        keep_candidates: the keep fractions ``"auto"`` tries.
        fine: weight the source samples by the domain classifier's density ratio.
        min_weight: source samples whose normalised weight is below this are dropped.
        max_weight: cap on a normalised weight (bounds the variance of the estimate).
        domain_l2: the domain classifier's ridge penalty.
        domain_columns: feature columns the domain classifier sees (default all); leave out
            anything that names the domain outright, or it separates them perfectly.
        source_weight: multiplies every source sample's weight against the target's 1.
        distill: ``"adaptive"`` (the per-sample weight of :mod:`.distill`), ``"fixed"``
            (``alpha = strength`` everywhere) or ``"none"``.
        strength: lambda of the distillation weight (0 turns the distillation term off, the
            student still starts from the teacher), or ``"auto"``: the best of
            ``strength_candidates`` on the validation split.
        strength_candidates: the lambdas ``"auto"`` tries.
        kd_temperature: tau of the distillation weight.
        init_from_teacher: start the student from the teacher's weights (representation
            transfer) at ``init_lr_scale`` times the learning rate, rather than from scratch;
            needs a :class:`BinaryMLP` teacher and a distillation mode other than ``"none"``.
        fallback: when searching (any ``"auto"``), also try the target alone on a fresh
            network, the negative-transfer guard of the module docstring.
        val_fraction: the latest share of target samples used for early stopping.
        update_steps: the step budget of a continual :meth:`update`.
        seed: every network's initial weights and minibatch order.
        **network: ``BinaryMLP`` settings (hidden, dropout, l2, lr, batch_size, max_steps...).
    """

    def __init__(
        self,
        *,
        coarse: bool = True,
        keep_fraction: float | Auto = "auto",
        keep_candidates: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
        fine: bool = True,
        min_weight: float = 0.05,
        max_weight: float = 10.0,
        domain_l2: float = 1e-2,
        domain_columns: np.ndarray | None = None,
        source_weight: float = 1.0,
        distill: DistillMode = "adaptive",
        strength: float | Auto = "auto",
        strength_candidates: Sequence[float] = (0.0, 1.0),
        kd_temperature: float = 0.5,
        init_from_teacher: bool = True,
        init_lr_scale: float = 0.25,
        fallback: bool = True,
        val_fraction: float = 0.2,
        update_steps: int = 1000,
        seed: int = 0,
        **network: Any,
    ) -> None:
        if distill not in ("adaptive", "fixed", "none"):
            raise ValueError("distill must be 'adaptive', 'fixed' or 'none'")
        if not 0 < val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        keeps = keep_candidates if keep_fraction == "auto" else (keep_fraction,)
        if not keeps or not all(0 <= float(k) <= 1 for k in keeps):
            raise ValueError("keep fractions must be in [0, 1]")
        strengths = strength_candidates if strength == "auto" else (strength,)
        if not strengths or not all(float(v) >= 0 for v in strengths):
            raise ValueError("distillation strengths must be >= 0")
        self.coarse = coarse
        self.keep_fraction = keep_fraction
        self.keep_candidates = tuple(float(k) for k in keep_candidates)
        self.fine = fine
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.domain_l2 = domain_l2
        self.domain_columns = domain_columns
        self.source_weight = source_weight
        self.distill = distill
        self.strength = strength
        self.strength_candidates = tuple(float(v) for v in strength_candidates)
        self.kd_temperature = kd_temperature
        self.init_from_teacher = init_from_teacher
        self.init_lr_scale = init_lr_scale
        self.fallback = fallback
        self.val_fraction = val_fraction
        self.update_steps = update_steps
        self.seed = seed
        self.network = network
        self.student: BinaryMLP | None = None
        self.teacher: BinaryMLP | None = None
        self.selection: Selection | None = None
        self.validation: DomainSamples | None = None
        self.chosen: dict[str, float | bool] = {}
        self.search: list[Candidate] = []

    def fit(
        self,
        target: DomainSamples,
        source: DomainSamples,
        *,
        graph: InteractionGraph | None = None,
        teacher: BinaryMLP | None = None,
    ) -> Self:
        """Select source samples, get a teacher, and train the student from scratch.

        ``teacher`` is an entire-space model already trained (``logit(x)`` is all that is
        used); without one, a :class:`BinaryMLP` is trained on target + all source samples.
        With ``"auto"`` settings every candidate gets a student; the one with the lowest
        validation log-loss is kept (``chosen``, ``search``).
        """
        grid = [(k, v, True) for k in self._keep_grid() for v in self._strength_grid()]
        searching = "auto" in (self.keep_fraction, self.strength)
        if self.fallback and searching and self.init_from_teacher and self.distill != "none":
            grid.append((0.0, 0.0, False))  # last: a tie keeps the teacher's knowledge
        return self._train(
            target, source, graph=graph, teacher=teacher, grid=grid, warm_start=False
        )

    def update(
        self,
        target: DomainSamples,
        source: DomainSamples,
        *,
        graph: InteractionGraph | None = None,
        teacher: BinaryMLP | None = None,
    ) -> Self:
        """Continual mode: the same recipe on a new period, starting from the current student.

        Selection is redone on the new period's samples (and graph, when given) with the keep
        fraction and strength chosen at ``fit`` (no new search: one student continues); the
        student, and an internally trained teacher, continue from their weights for
        ``update_steps``. Early stopping looks at the new period's validation split together
        with the previous ones, so an update that fits the new period by forgetting the old
        one is not kept.
        """
        if self.student is None:
            raise RuntimeError("fit the adapter before updating it")
        chosen = self.chosen
        grid = [
            (
                float(chosen["keep_fraction"]),
                float(chosen["strength"]),
                bool(chosen["from_teacher"]),
            )
        ]
        return self._train(target, source, graph=graph, teacher=teacher, grid=grid, warm_start=True)

    def logit(self, x: np.ndarray) -> np.ndarray:
        if self.student is None:
            raise RuntimeError("fit the adapter first")
        return self.student.logit(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``[n]`` probability of the positive label for target-domain samples."""
        if self.student is None:
            raise RuntimeError("fit the adapter first")
        return self.student.predict_proba(x)

    def select(
        self,
        target: DomainSamples,
        source: DomainSamples,
        graph: InteractionGraph | None = None,
        *,
        keep_fraction: float | None = None,
    ) -> Selection:
        """Coarse then fine selection; the student's weight of every source sample (0 = out).

        ``keep_fraction`` defaults to the configured one, or the one ``fit`` chose.
        """
        if keep_fraction is None:
            if self.keep_fraction != "auto":
                keep_fraction = float(self.keep_fraction)
            elif "keep_fraction" in self.chosen:
                keep_fraction = float(self.chosen["keep_fraction"])
            else:
                raise RuntimeError("keep_fraction='auto' is chosen by fit: fit first or pass one")
        return self._select(
            target, source, self._graph_scores(target, source, graph), keep_fraction
        )

    def _keep_grid(self) -> list[float]:
        """Keep fractions to try; without the graph ranking only "none" and "all" exist."""
        keeps = list(self.keep_candidates) if self.keep_fraction == "auto" else [self.keep_fraction]
        if not self.coarse:
            keeps = [k for k in keeps if k in (0.0, 1.0)] or [1.0]
        return sorted(set(float(k) for k in keeps))

    def _strength_grid(self) -> list[float]:
        if self.distill == "none":
            return [0.0]
        chosen = self.strength_candidates if self.strength == "auto" else [self.strength]
        return sorted(set(float(v) for v in chosen))

    def _graph_scores(
        self,
        target: DomainSamples,
        source: DomainSamples,
        graph: InteractionGraph | None,
    ) -> np.ndarray | None:
        """Every source sample's closeness to the target on the graph (None without ``coarse``)."""
        if not self.coarse:
            return None
        if graph is None or source.users is None or target.users is None:
            raise ValueError("the graph selection needs a graph and user/item indices")
        assert source.items is not None and target.items is not None
        lift = node_lift(graph, target.users, target.items)
        return sample_scores(graph, lift, source.users, source.items)

    def _select(
        self,
        target: DomainSamples,
        source: DomainSamples,
        scores: np.ndarray | None,
        keep_fraction: float,
    ) -> Selection:
        if keep_fraction == 0:
            kept = np.zeros(len(source), dtype=bool)
        elif scores is not None:
            kept = coarse_select(scores, keep_fraction)
        else:
            kept = np.ones(len(source), dtype=bool)
        weights = np.zeros(len(source))
        weights[kept] = 1.0
        stats: dict[str, float] = {"coarse_kept": float(kept.sum())}
        if self.fine and kept.any():
            columns = (
                slice(None) if self.domain_columns is None else np.asarray(self.domain_columns)
            )
            classifier = DomainClassifier(l2=self.domain_l2).fit(
                source.x[kept][:, columns], target.x[:, columns]
            )
            ratio = classifier.density_ratio(source.x[kept][:, columns])
            w = importance_weights(ratio, max_weight=self.max_weight)
            w = np.where(w >= self.min_weight, w, 0.0)
            weights[kept] = w / max(w.mean(), 1e-12)
            target_p = classifier.predict_proba(target.x[:, columns])
            stats["domain_auc"] = _auc(
                np.concatenate([np.zeros(int(kept.sum())), np.ones(len(target))]),
                np.concatenate([classifier.predict_proba(source.x[kept][:, columns]), target_p]),
            )
        final = weights > 0
        stats["fine_kept"] = float(final.sum())
        # Kish's effective sample size: how many equally weighted samples the weights are worth.
        stats["effective_source"] = (
            float(weights.sum() ** 2 / (weights**2).sum()) if final.any() else 0.0
        )
        return Selection(len(source), kept, weights, scores, stats)

    def _train(
        self,
        target: DomainSamples,
        source: DomainSamples,
        *,
        graph: InteractionGraph | None,
        teacher: BinaryMLP | None,
        grid: list[tuple[float, float, bool]],
        warm_start: bool,
    ) -> Self:
        """One student per ``(keep_fraction, strength, from_teacher)`` of ``grid``; the best on
        validation stays.

        A continual update (``warm_start``) continues a copy of the current student; a fit
        starts each candidate afresh. The teacher, its logits and the graph scores are shared
        by every candidate, the selection by the candidates of one keep fraction.
        """
        train, validation = self.split(target)
        if warm_start and self.validation is not None:
            # early stopping also judges the previous period, so a forgetting update loses
            validation = _concat(self.validation, validation)
        if teacher is not None:
            self.teacher = teacher
        elif self.distill != "none":
            self.teacher = self._entire_space(train, source, validation, warm_start)
        teacher_logit = (
            None
            if self.teacher is None or self.distill == "none"
            else self.teacher.logit(np.concatenate([train.x, source.x]))
        )
        needs_graph = any(keep > 0 for keep, _, _ in grid)
        scores = self._graph_scores(train, source, graph) if needs_graph else None
        selections: dict[float, Selection] = {}
        search: list[Candidate] = []
        for keep, strength, from_teacher in grid:
            if keep not in selections:
                selections[keep] = self._select(train, source, scores, keep)
            selection = selections[keep]
            rows = np.concatenate(
                [np.arange(len(train)), len(train) + np.flatnonzero(selection.kept)]
            )
            x = np.concatenate([train.x, source.x[selection.kept]])
            y = np.concatenate([train.y, source.y[selection.kept]])
            w = np.concatenate(
                [np.ones(len(train)), self.source_weight * selection.weights[selection.kept]]
            )
            distillation = (
                None
                if teacher_logit is None or not from_teacher
                else Distillation(
                    teacher_logit[rows],
                    strength=strength,
                    temperature=self.kd_temperature,
                    adaptive=self.distill == "adaptive",
                )
            )
            if warm_start:
                student = copy.deepcopy(self.student)
            elif from_teacher:
                student = self._initial_student()
            else:
                student = BinaryMLP(seed=self.seed, **self.network)
            assert student is not None
            student.fit(
                x,
                y,
                validation=(validation.x, validation.y),
                sample_weight=w,
                distillation=distillation,
                # a student copied from the teacher continues from its weights and input scaling
                warm_start=warm_start or student.module is not None,
                max_steps=self.update_steps if warm_start else None,
            )
            loss = _log_loss(validation.y, student.logit(validation.x))
            search.append(Candidate(keep, strength, from_teacher, loss, selection, student))
        best = min(search, key=lambda c: c.val_loss)  # ties: the first in grid order
        self.validation = validation
        self.search = search
        self.chosen = {
            "keep_fraction": best.keep_fraction,
            "strength": best.strength,
            "from_teacher": best.from_teacher,
        }
        self.selection = best.selection
        self.student = best.student
        return self

    def _initial_student(self) -> BinaryMLP:
        """A fresh network, or a copy of the teacher to continue from (at a lower rate)."""
        if (
            self.init_from_teacher
            and isinstance(self.teacher, BinaryMLP)
            and self.distill != "none"
        ):
            student = copy.deepcopy(self.teacher)
            student.config["lr"] = float(student.config["lr"]) * self.init_lr_scale
            student.config["seed"] = self.seed
            return student
        return BinaryMLP(seed=self.seed, **self.network)

    def _entire_space(
        self,
        train: DomainSamples,
        source: DomainSamples,
        validation: DomainSamples,
        warm_start: bool,
    ) -> BinaryMLP:
        """The teacher: every sample of the entire space, equally weighted."""
        x = np.concatenate([train.x, source.x])
        y = np.concatenate([train.y, source.y])
        if warm_start and self.teacher is not None:
            # a copy: the previous period's teacher may be a model the caller still uses
            return copy.deepcopy(self.teacher).fit(
                x,
                y,
                validation=(validation.x, validation.y),
                warm_start=True,
                max_steps=self.update_steps,
            )
        return BinaryMLP(seed=self.seed, **self.network).fit(
            x, y, validation=(validation.x, validation.y)
        )

    def split(self, target: DomainSamples) -> tuple[DomainSamples, DomainSamples]:
        """(training, validation): the latest ``val_fraction`` of the time-ordered samples
        validate, so early stopping judges the model on the period closest to its use."""
        n_val = max(1, int(round(len(target) * self.val_fraction)))
        if len(target) - n_val < 1:
            raise ValueError("the target domain needs at least two samples")
        rows = np.arange(len(target))
        return target.take(rows[:-n_val]), target.take(rows[-n_val:])


def _concat(a: DomainSamples, b: DomainSamples) -> DomainSamples:
    def both(u: np.ndarray | None, v: np.ndarray | None) -> np.ndarray | None:
        return None if u is None or v is None else np.concatenate([u, v])

    return DomainSamples(
        np.concatenate([a.x, b.x]),
        np.concatenate([a.y, b.y]),
        both(a.users, b.users),
        both(a.items, b.items),
    )


def _log_loss(labels: np.ndarray, logit: np.ndarray) -> float:
    """Mean binary cross-entropy of logits, computed stably (``log(1 + e^z) - y z``)."""
    logit = np.asarray(logit, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, logit) - np.asarray(labels) * logit))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank AUC (ties averaged), so the package core needs no scikit-learn."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
