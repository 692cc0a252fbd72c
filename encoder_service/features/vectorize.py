"""Turn feature states into the encoder's fixed-length float32 input, laid out by a schema.

Everything here reads only the state and the schema, never the clock, so the same state gives the
same vector in the training job, in ``publish`` and in the refresher. Distributions are normalised
so that a decayed sum's absolute scale (which shrinks as the state ages) never leaks into them;
the scale itself enters the ``activity`` group as log-mass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from encoder_service.features.schema import OTHER, FeatureSchema, Segment
from encoder_service.features.state import SECONDS_PER_DAY, FeatureState


class Vectorizer:
    """Precomputes the schema's lookup tables once; ``__call__`` maps states to rows."""

    def __init__(self, schema: FeatureSchema, catalog_id: str | None) -> None:
        self.schema = schema
        self.catalog_id = catalog_id
        self._segments = {s.name: s for g in schema.groups for s in g.segments}
        self._category_slot = {name: i for i, name in enumerate(schema.category_slots)}
        self._event_type_slot = {name: i for i, name in enumerate(schema.event_type_slots)}
        self._context_slot = {name: i for i, name in enumerate(schema.context_slots)}
        self._horizons = [f"{int(h)}d" for h in schema.half_lives_days]
        self._affinity_start = schema.group("affinity").start

    @property
    def input_dim(self) -> int:
        return self.schema.input_dim

    def __call__(self, states: Iterable[FeatureState]) -> np.ndarray:
        """Rows ``[n_states, input_dim]`` float32."""
        rows = [self.row(state) for state in states]
        if not rows:
            return np.zeros((0, self.input_dim), dtype=np.float32)
        return np.stack(rows)

    def row(self, state: FeatureState) -> np.ndarray:
        x = np.zeros(self.input_dim, dtype=np.float64)
        self._affinity(state, x)
        self._item_taste(state, x)
        self._activity(state, x)
        self._rhythm(state, x)
        self._context(state, x)
        self._profile(state, x)
        return x.astype(np.float32)

    def _affinity(self, state: FeatureState, x: np.ndarray) -> None:
        """All horizons at once: the affinity segments are consecutive ``[H, C]`` blocks."""
        if not state.categories:
            return
        other = self._category_slot[OTHER]
        slots = [self._category_slot.get(name, other) for name in state.categories]
        values = np.array(list(state.categories.values()))  # [k, H]
        block = np.zeros((len(self._category_slot), values.shape[1]))
        np.add.at(block, slots, values)
        totals = block.sum(axis=0)
        block /= np.where(totals > 0, totals, 1.0)
        x[self._affinity_start : self._affinity_start + block.size] = block.T.ravel()

    def _item_taste(self, state: FeatureState, x: np.ndarray) -> None:
        if self.schema.item_vector_dim == 0 or self.catalog_id is None:
            return
        sums = state.item_sums.get(self.catalog_id)
        if sums is None:
            return
        for h, horizon in enumerate(self._horizons):
            seg = self._segments[f"item_taste_{horizon}"]
            if state.mass[h] > 0:
                x[seg.start : seg.end] = sums[h] / state.mass[h]

    def _activity(self, state: FeatureState, x: np.ndarray) -> None:
        seg = self._segments["activity"]
        n = state.count
        values = [math.log1p(n)]
        values.extend(math.log1p(max(m, 0.0)) for m in state.mass)
        if n:
            span_days = max(state.t_last - state.t_first, 0.0) / SECONDS_PER_DAY
            mean_w = state.weight_sum / n
            var_w = max(state.weight_sq_sum / n - mean_w * mean_w, 0.0)
            gap_days = span_days / (n - 1) if n > 1 else 0.0
        else:
            span_days = mean_w = var_w = gap_days = 0.0
        values.extend([math.log1p(span_days), math.log1p(gap_days), mean_w, math.sqrt(var_w)])
        x[seg.start : seg.end] = values

    def _rhythm(self, state: FeatureState, x: np.ndarray) -> None:
        seg = self._segments["heatmap"]
        view = x[seg.start : seg.end]
        view[:] = state.heatmap
        _normalise(view)

    def _context(self, state: FeatureState, x: np.ndarray) -> None:
        _fill_distribution(
            x, self._segments.get("event_type"), state.event_types, self._event_type_slot
        )
        _fill_distribution(x, self._segments.get("context"), state.contexts, self._context_slot)

    def _profile(self, state: FeatureState, x: np.ndarray) -> None:
        for field in self.schema.profile_fields:
            seg = self._segments[f"profile.{field.name}"]
            value = state.profile.get(field.name)
            if field.numeric:
                number = _as_number(value)
                if number is None:
                    x[seg.start + 1] = 1.0
                else:
                    x[seg.start] = (number - field.mean) / field.std
            else:
                vocabulary = field.vocabulary
                if value is None:
                    slot = len(vocabulary) + 1  # unknown
                else:
                    text = _as_label(value)
                    slot = vocabulary.index(text) if text in vocabulary else len(vocabulary)
                x[seg.start + slot] = 1.0


def _fill_distribution(
    x: np.ndarray, seg: Segment | None, weights: dict[str, float], slots: dict[str, int]
) -> None:
    """Add name-keyed weights into their slots (unseen names into ``OTHER``) and normalise."""
    if seg is None:
        return
    view = x[seg.start : seg.end]
    other = slots[OTHER]
    for name, value in weights.items():
        view[slots.get(name, other)] += value
    _normalise(view)


def _normalise(view: np.ndarray) -> None:
    total = view.sum()
    if total > 0:
        view /= total


def _as_number(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_label(value: str | float) -> str:
    """Profile labels compare as text; integral numbers print without a trailing ``.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
