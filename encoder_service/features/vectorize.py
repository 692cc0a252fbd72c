"""Turn feature states into the encoder's fixed-length float32 input, laid out by a schema.

Everything here reads only the state and the schema, never the clock, so the same state gives the
same vector in the training job, in ``publish`` and in the refresher. Distributions are normalised
so that a decayed sum's absolute scale (which shrinks as the state ages) never leaks into them;
the scale itself enters the ``activity`` group as log-mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from encoder_service.features.batch import NamedSums, StateBatch
from encoder_service.features.schema import OTHER, FeatureSchema, Segment
from encoder_service.features.state import SECONDS_PER_DAY, FeatureState


class Vectorizer:
    """Precomputes the schema's lookup tables once; ``__call__`` maps states to rows.

    Works on a :class:`StateBatch`, a whole batch of users per numpy call: the refresher hands
    it the batch it just applied events to, and lists of ``FeatureState`` (training, publish)
    are converted first, so every caller shares one implementation and gets the same bits.
    """

    def __init__(self, schema: FeatureSchema, catalog_id: str | None) -> None:
        self.schema = schema
        self.catalog_id = catalog_id
        self._segments = {s.name: s for g in schema.groups for s in g.segments}
        self._category_slot = {name: i for i, name in enumerate(schema.category_slots)}
        self._event_type_slot = {name: i for i, name in enumerate(schema.event_type_slots)}
        self._context_slot = {name: i for i, name in enumerate(schema.context_slots)}
        self._horizons = [f"{int(h)}d" for h in schema.half_lives_days]
        self._affinity_start = schema.group("affinity").start
        self._vocabularies = [_slots(f.vocabulary) for f in schema.profile_fields]

    @property
    def input_dim(self) -> int:
        return self.schema.input_dim

    def __call__(self, states: Sequence[FeatureState] | StateBatch) -> np.ndarray:
        """Rows ``[n_states, input_dim]`` float32."""
        batch = states if isinstance(states, StateBatch) else StateBatch.from_states(states)
        x = np.zeros((len(batch), self.input_dim), dtype=np.float64)
        if len(batch):
            self._affinity(batch, x)
            self._item_taste(batch, x)
            self._activity(batch, x)
            self._rhythm(batch, x)
            self._context(batch, x)
            self._profile(batch, x)
        return x.astype(np.float32)

    def _affinity(self, batch: StateBatch, x: np.ndarray) -> None:
        """All horizons at once: the affinity segments are consecutive ``[H, C]`` blocks."""
        sums = batch.categories
        if not len(sums):
            return
        other = self._category_slot[OTHER]
        slots = [self._category_slot.get(name, other) for name in sums.names]
        block = np.zeros((len(batch), len(self._category_slot), sums.width))
        np.add.at(block, (sums.owners(), np.asarray(slots, dtype=np.intp)), sums.values)
        totals = block.sum(axis=1, keepdims=True)
        block /= np.where(totals > 0, totals, 1.0)
        start = self._affinity_start
        x[:, start : start + block[0].size] = block.transpose(0, 2, 1).reshape(len(batch), -1)

    def _item_taste(self, batch: StateBatch, x: np.ndarray) -> None:
        """Weighted means of the catalogue's item vectors, split as the catalogue lays them
        out: item vector into ``item_taste``, then the item attributes into
        ``item_attributes``, then the popularity coordinates into ``popularity``."""
        taste = self.schema.item_vector_dim
        attributes = len(self.schema.item_attributes)
        popularity = self.schema.popularity_width
        if taste + attributes + popularity == 0 or self.catalog_id is None:
            return
        sums = batch.item_sums.get(self.catalog_id)
        if sums is None:
            return
        if sums.shape[2] != taste + attributes + popularity:
            raise ValueError(
                f"item sums of {self.catalog_id} are {sums.shape[2]} wide; the schema expects "
                f"{taste} + {attributes} attribute + {popularity} popularity coordinates"
            )
        held = (batch.mass > 0) & batch.item_present[self.catalog_id][:, None]
        mass = np.where(held, batch.mass, 1.0)
        means = np.where(held[:, :, None], sums / mass[:, :, None], 0.0)  # [n, H, dim]
        bins = self.schema.popularity_bins
        pop = taste + attributes
        for h, horizon in enumerate(self._horizons):
            for name, start, end in (
                ("item_taste", 0, taste),
                ("item_attributes", taste, pop),
                ("popularity", pop, pop + bins),
            ):
                if end > start:
                    seg = self._segments[f"{name}_{horizon}"]
                    x[:, seg.start : seg.end] = means[:, h, start:end]
        if popularity:
            seg = self._segments["popularity_log_count"]
            x[:, seg.start : seg.end] = means[:, :, pop + bins]

    def _activity(self, batch: StateBatch, x: np.ndarray) -> None:
        """log1p count and masses, span and mean gap in days, weight mean and spread."""
        seg = self._segments["activity"]
        n = batch.count.astype(np.float64)
        some = n > 0
        safe_n = np.where(some, n, 1.0)
        span_days = np.maximum(batch.t_last - batch.t_first, 0.0, where=some, out=np.zeros_like(n))
        span_days /= SECONDS_PER_DAY
        mean_w = np.where(some, batch.weight_sum / safe_n, 0.0)
        var_w = np.where(some, np.maximum(batch.weight_sq_sum / safe_n - mean_w * mean_w, 0.0), 0.0)
        gap_days = np.where(n > 1, span_days / np.maximum(n - 1, 1.0), 0.0)
        columns = [
            np.log1p(n)[:, None],
            np.log1p(np.maximum(batch.mass, 0.0)),
            np.log1p(span_days)[:, None],
            np.log1p(gap_days)[:, None],
            mean_w[:, None],
            np.sqrt(var_w)[:, None],
        ]
        x[:, seg.start : seg.end] = np.concatenate(columns, axis=1)

    def _rhythm(self, batch: StateBatch, x: np.ndarray) -> None:
        seg = self._segments["heatmap"]
        x[:, seg.start : seg.end] = _normalised(batch.heatmap)

    def _context(self, batch: StateBatch, x: np.ndarray) -> None:
        _fill_distribution(
            x, self._segments.get("event_type"), batch.event_types, self._event_type_slot
        )
        _fill_distribution(x, self._segments.get("context"), batch.contexts, self._context_slot)

    def _profile(self, batch: StateBatch, x: np.ndarray) -> None:
        """Numeric fields standardised with a missing flag, categorical ones one-hot."""
        fields = list(zip(self.schema.profile_fields, self._vocabularies, strict=True))
        starts = [self._segments[f"profile.{f.name}"].start for f in self.schema.profile_fields]
        for u, profile in enumerate(batch.profiles):
            row = x[u]
            for (field, vocabulary), start in zip(fields, starts, strict=True):
                value = profile.get(field.name)
                if field.numeric:
                    number = _as_number(value)
                    if number is None:
                        row[start + 1] = 1.0
                    else:
                        row[start] = (number - field.mean) / field.std
                elif value is None:
                    row[start + len(vocabulary) + 1] = 1.0  # unknown
                else:
                    row[start + vocabulary.get(_as_label(value), len(vocabulary))] = 1.0


def _fill_distribution(
    x: np.ndarray, seg: Segment | None, sums: NamedSums, slots: dict[str, int]
) -> None:
    """Add name-keyed weights into their slots (unseen names into ``OTHER``) and normalise."""
    if seg is None:
        return
    block = np.zeros((len(x), seg.width))
    if len(sums):
        other = slots[OTHER]
        columns = [slots.get(name, other) for name in sums.names]
        np.add.at(block, (sums.owners(), np.asarray(columns, dtype=np.intp)), sums.values[:, 0])
    x[:, seg.start : seg.end] = _normalised(block)


def _normalised(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; all-zero rows stay zero."""
    totals = rows.sum(axis=1, keepdims=True)
    return rows / np.where(totals > 0, totals, 1.0)


def _slots(vocabulary: Sequence[str]) -> dict[str, int]:
    """Label -> its first position, what ``vocabulary.index`` answers, in one lookup."""
    slots: dict[str, int] = {}
    for slot, label in enumerate(vocabulary):
        slots.setdefault(label, slot)
    return slots


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
