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
4. **Continual mode**: :meth:`CrossDomainAdapter.update` trains on a new period starting from
   the previous student (and teacher), without retraining from scratch.

Samples are passed in time order: the last ``val_fraction`` of the target's samples is the
validation split that early stopping of every network looks at.
"""

from __future__ import annotations

import copy
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


class CrossDomainAdapter:
    """Train a target-domain model from its own samples plus the entire space's.

    Args:
        coarse: use the graph selection (needs ``graph`` and user/item indices in ``fit``).
        keep_fraction: share of source samples the graph selection keeps.
        fine: weight the source samples by the domain classifier's density ratio.
        min_weight: source samples whose normalised weight is below this are dropped.
        max_weight: cap on a normalised weight (bounds the variance of the estimate).
        domain_l2: the domain classifier's ridge penalty.
        domain_columns: feature columns the domain classifier sees (default all); leave out
            anything that names the domain outright, or it separates them perfectly.
        source_weight: multiplies every source sample's weight against the target's 1.
        distill: ``"adaptive"`` (the per-sample weight of :mod:`.distill`), ``"fixed"``
            (``alpha = strength`` everywhere) or ``"none"``.
        strength, kd_temperature: lambda and tau of the distillation weight.
        init_from_teacher: start the student from the teacher's weights (representation
            transfer) at ``init_lr_scale`` times the learning rate, rather than from scratch;
            needs a :class:`BinaryMLP` teacher and a distillation mode other than ``"none"``.
        val_fraction: the latest share of target samples used for early stopping.
        update_steps: the step budget of a continual :meth:`update`.
        seed: every network's initial weights and minibatch order.
        **network: ``BinaryMLP`` settings (hidden, dropout, l2, lr, batch_size, max_steps...).
    """

    def __init__(
        self,
        *,
        coarse: bool = True,
        keep_fraction: float = 0.5,
        fine: bool = True,
        min_weight: float = 0.05,
        max_weight: float = 10.0,
        domain_l2: float = 1e-2,
        domain_columns: np.ndarray | None = None,
        source_weight: float = 1.0,
        distill: DistillMode = "adaptive",
        strength: float = 1.0,
        kd_temperature: float = 0.5,
        init_from_teacher: bool = True,
        init_lr_scale: float = 0.25,
        val_fraction: float = 0.2,
        update_steps: int = 1000,
        seed: int = 0,
        **network: Any,
    ) -> None:
        if distill not in ("adaptive", "fixed", "none"):
            raise ValueError("distill must be 'adaptive', 'fixed' or 'none'")
        if not 0 < val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        self.coarse = coarse
        self.keep_fraction = keep_fraction
        self.fine = fine
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.domain_l2 = domain_l2
        self.domain_columns = domain_columns
        self.source_weight = source_weight
        self.distill = distill
        self.strength = strength
        self.kd_temperature = kd_temperature
        self.init_from_teacher = init_from_teacher
        self.init_lr_scale = init_lr_scale
        self.val_fraction = val_fraction
        self.update_steps = update_steps
        self.seed = seed
        self.network = network
        self.student: BinaryMLP | None = None
        self.teacher: BinaryMLP | None = None
        self.selection: Selection | None = None
        self.validation: DomainSamples | None = None

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
        """
        return self._train(target, source, graph=graph, teacher=teacher, warm_start=False)

    def update(
        self,
        target: DomainSamples,
        source: DomainSamples,
        *,
        graph: InteractionGraph | None = None,
        teacher: BinaryMLP | None = None,
    ) -> Self:
        """Continual mode: the same recipe on a new period, starting from the current student.

        Selection is redone on the new period's samples (and graph, when given); the student,
        and an internally trained teacher, continue from their weights for ``update_steps``.
        Early stopping looks at the new period's validation split together with the previous
        ones, so an update that fits the new period by forgetting the old one is not kept.
        """
        if self.student is None:
            raise RuntimeError("fit the adapter before updating it")
        return self._train(target, source, graph=graph, teacher=teacher, warm_start=True)

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
    ) -> Selection:
        """Coarse then fine selection; the student's weight of every source sample (0 = out)."""
        kept = np.ones(len(source), dtype=bool)
        scores = None
        if self.coarse:
            if graph is None or source.users is None or target.users is None:
                raise ValueError("the graph selection needs a graph and user/item indices")
            assert source.items is not None and target.items is not None
            lift = node_lift(graph, target.users, target.items)
            scores = sample_scores(graph, lift, source.users, source.items)
            kept = coarse_select(scores, self.keep_fraction)
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
        warm_start: bool,
    ) -> Self:
        train, validation = self.split(target)
        if warm_start and self.validation is not None:
            # early stopping also judges the previous period, so a forgetting update loses
            validation = _concat(self.validation, validation)
        self.validation = validation
        self.selection = self.select(train, source, graph)
        if teacher is not None:
            self.teacher = teacher
        elif self.distill != "none":
            self.teacher = self._entire_space(train, source, validation, warm_start)
        kept = self.selection.kept
        x = np.concatenate([train.x, source.x[kept]])
        y = np.concatenate([train.y, source.y[kept]])
        w = np.concatenate([np.ones(len(train)), self.source_weight * self.selection.weights[kept]])
        distillation = None
        if self.distill != "none":
            assert self.teacher is not None
            distillation = Distillation(
                self.teacher.logit(x),
                strength=self.strength,
                temperature=self.kd_temperature,
                adaptive=self.distill == "adaptive",
            )
        continued = warm_start and self.student is not None
        if not continued:
            self.student = self._initial_student()
        assert self.student is not None
        self.student.fit(
            x,
            y,
            validation=(validation.x, validation.y),
            sample_weight=w,
            distillation=distillation,
            # a student copied from the teacher continues from its weights and input scaling
            warm_start=continued or self.student.module is not None,
            max_steps=self.update_steps if continued else None,
        )
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
