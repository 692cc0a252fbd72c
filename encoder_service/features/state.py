"""Per-user feature state: small, incrementally updatable aggregates shared by both stages.

Every aggregate is an exponentially time-decayed sum held "as of" the user's latest event time
``t_last``. A sum of ``w * 2**(-(t_last - t) / half_life)`` does not depend on the order in which
events arrive, so ``apply`` is O(1) per event, accepts late events, and replaying a history event
by event gives the same state as the batch build in ``features/build.py``.

Category, event-type and context aggregates are keyed by *name*, not by a model's vocabulary, so
one state serves every live model version, including versions trained on a newer vocabulary.
Item-vector sums depend on a version's item catalogue and are kept per catalogue hash.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import orjson

from encoder_service.data.contract import Event
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.schema import (
    HALF_LIVES_DAYS,
    HEATMAP_CELLS,
    RHYTHM_HALF_LIFE_DAYS,
    UNKNOWN,
)

SECONDS_PER_DAY = 86_400.0
STATE_MAGIC = b"FS2"
LEGACY_STATE_MAGIC = b"FS1"
"""States written before ``FS2`` (floats as JSON text); still read, rewritten as ``FS2``."""
STATE_HEADER = struct.Struct("<3sI")


def heatmap_cell(timestamp: float) -> int:
    """Day-of-week (Monday = 0) x hour-of-day cell, in UTC."""
    day = int(timestamp // SECONDS_PER_DAY)
    hour = int((timestamp % SECONDS_PER_DAY) // 3600)
    return ((day + 3) % 7) * 24 + hour  # 1970-01-01 was a Thursday


def decay_factors(delta_seconds: float, half_lives_days: tuple[float, ...]) -> np.ndarray:
    """``2**(-delta / half_life)`` for each half-life; delta may be negative (a late event)."""
    days = delta_seconds / SECONDS_PER_DAY
    return np.exp2(-days / np.asarray(half_lives_days, dtype=np.float64))


@dataclass
class FeatureState:
    """The aggregates of one user; all decayed sums are as of ``t_last``.

    Attributes:
        mass: decayed total weight per half-life, shape ``[H]``.
        categories: category name -> decayed weight per half-life ``[H]``; an item with k
            categories gives each ``weight / k``.
        heatmap: decayed weight per day-of-week x hour cell ``[168]`` (long half-life).
        event_types / contexts: name -> decayed weight (long half-life); no context is ``UNKNOWN``.
        item_sums: catalogue hash -> decayed weighted sum of item vectors ``[H, dim]``.
        profile: the latest known profile fields.
    """

    t_first: float = math.inf
    t_last: float = -math.inf
    count: int = 0
    weight_sum: float = 0.0
    weight_sq_sum: float = 0.0
    mass: np.ndarray = field(default_factory=lambda: np.zeros(len(HALF_LIVES_DAYS)))
    categories: dict[str, np.ndarray] = field(default_factory=dict)
    heatmap: np.ndarray = field(default_factory=lambda: np.zeros(HEATMAP_CELLS))
    event_types: dict[str, float] = field(default_factory=dict)
    contexts: dict[str, float] = field(default_factory=dict)
    item_sums: dict[str, np.ndarray] = field(default_factory=dict)
    profile: dict[str, str | float | None] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.count == 0

    def apply(self, event: Event, catalogs: Mapping[str, ItemCatalog]) -> None:
        """Fold one event in, in O(number of distinct names held), whatever its arrival order.

        Args:
            event: a validated event.
            catalogs: catalogue hash -> catalogue, one per live model version; each keeps its own
                item-vector sum. Item categories come from the first catalogue that knows the
                item, else from the event itself.
        """
        self.profile.update(event.profile)
        if self.count == 0:
            self.t_first = self.t_last = event.timestamp
        delta = event.timestamp - self.t_last
        if delta >= 0:
            self._age(delta)
            self.t_last = event.timestamp
            scale = np.ones(len(HALF_LIVES_DAYS))
            rhythm_scale = 1.0
        else:
            scale = decay_factors(-delta, HALF_LIVES_DAYS)
            rhythm_scale = float(decay_factors(-delta, (RHYTHM_HALF_LIFE_DAYS,))[0])
        self.t_first = min(self.t_first, event.timestamp)
        self.count += 1
        w = event.weight
        self.weight_sum += w
        self.weight_sq_sum += w * w
        contribution = w * scale
        self.mass += contribution

        categories = item_categories(event, catalogs)
        if categories:
            share = contribution / len(categories)
            for name in categories:
                held = self.categories.get(name)
                self.categories[name] = share.copy() if held is None else held + share
        for catalog_id, catalog in catalogs.items():
            _, vector = catalog.lookup(event.item_id, categories)
            term = np.outer(contribution, vector)
            held = self.item_sums.get(catalog_id)
            self.item_sums[catalog_id] = term if held is None else held + term

        rhythm_w = w * rhythm_scale
        self.heatmap[heatmap_cell(event.timestamp)] += rhythm_w
        self.event_types[event.event_type] = self.event_types.get(event.event_type, 0.0) + rhythm_w
        context = event.context or UNKNOWN
        self.contexts[context] = self.contexts.get(context, 0.0) + rhythm_w

    def _age(self, delta_seconds: float) -> None:
        """Move every decayed sum ``delta_seconds`` forward in time."""
        if delta_seconds == 0 or self.count == 0:
            return
        factors = decay_factors(delta_seconds, HALF_LIVES_DAYS)
        rhythm = float(decay_factors(delta_seconds, (RHYTHM_HALF_LIFE_DAYS,))[0])
        self.mass *= factors
        for name in self.categories:
            self.categories[name] = self.categories[name] * factors
        for catalog_id in self.item_sums:
            self.item_sums[catalog_id] = self.item_sums[catalog_id] * factors[:, None]
        self.heatmap *= rhythm
        for name in self.event_types:
            self.event_types[name] *= rhythm
        for name in self.contexts:
            self.contexts[name] *= rhythm

    # --- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """``FS2``: a JSON header of names only, then every number in binary.

        Layout: ``b"FS2"``, the header length (u32), the header ``{"n": count, "cat": [...],
        "et": [...], "cx": [...], "p": profile, "it": [[catalogue, dim], ...]}``, then float64
        ``t_first, t_last, weight_sum, weight_sq_sum``, each category's ``[H]`` sums and each
        event type's and context's sum, in the header's name order (as exact as ``FS1``'s JSON
        numbers, without parsing text), then float32 ``mass, heatmap`` and the item sums.
        """
        item_ids = sorted(self.item_sums)
        header = {
            "n": self.count,
            "cat": list(self.categories),
            "et": list(self.event_types),
            "cx": list(self.contexts),
            "p": self.profile,
            "it": [[cid, int(self.item_sums[cid].shape[1])] for cid in item_ids],
        }
        head = orjson.dumps(header, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        exact = [
            np.array([self.t_first, self.t_last, self.weight_sum, self.weight_sq_sum]),
            *self.categories.values(),
            np.array(list(self.event_types.values()), dtype=np.float64),
            np.array(list(self.contexts.values()), dtype=np.float64),
        ]
        arrays = [self.mass, self.heatmap, *(self.item_sums[cid].ravel() for cid in item_ids)]
        return b"".join(
            (
                STATE_HEADER.pack(STATE_MAGIC, len(head)),
                head,
                np.concatenate(exact).astype("<f8").tobytes(),
                np.concatenate(arrays).astype("<f4").tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureState:
        """Read ``FS2``, or ``FS1`` as written before it (names and floats in the header)."""
        magic, head_len = STATE_HEADER.unpack_from(data)
        if magic not in (STATE_MAGIC, LEGACY_STATE_MAGIC):
            raise ValueError("not a feature state (bad magic)")
        header = orjson.loads(data[STATE_HEADER.size : STATE_HEADER.size + head_len])
        offset = STATE_HEADER.size + head_len
        h = len(HALF_LIVES_DAYS)
        if magic == STATE_MAGIC:
            n_cat, n_et, n_cx = len(header["cat"]), len(header["et"]), len(header["cx"])
            n_exact = 4 + n_cat * h + n_et + n_cx
            if len(data) < offset + 8 * n_exact:
                raise ValueError("feature state is truncated or has trailing bytes")
            exact = np.frombuffer(data, dtype="<f8", count=n_exact, offset=offset)
            offset += 8 * n_exact
            t_first, t_last, weight_sum, weight_sq_sum = exact[:4].tolist()
            cat_values = exact[4 : 4 + n_cat * h].reshape(n_cat, h)
            labels = exact[4 + n_cat * h :].tolist()
            categories = {k: cat_values[i].copy() for i, k in enumerate(header["cat"])}
            event_types = dict(zip(header["et"], labels[:n_et], strict=True))
            contexts = dict(zip(header["cx"], labels[n_et:], strict=True))
        else:
            t_first = header["t0"] if header["t0"] is not None else math.inf
            t_last = header["t1"] if header["t1"] is not None else -math.inf
            weight_sum, weight_sq_sum = header["ws"], header["wq"]
            categories = {k: np.asarray(v, dtype=np.float64) for k, v in header["cat"].items()}
            event_types, contexts = header["et"], header["cx"]
        if (len(data) - offset) % 4:
            raise ValueError("feature state is truncated or has trailing bytes")
        body = np.frombuffer(data, dtype="<f4", offset=offset).astype(np.float64)
        cursor = 0
        mass = body[cursor : cursor + h].copy()
        cursor += h
        heatmap = body[cursor : cursor + HEATMAP_CELLS].copy()
        cursor += HEATMAP_CELLS
        item_sums: dict[str, np.ndarray] = {}
        for cid, dim in header["it"]:
            item_sums[cid] = body[cursor : cursor + h * dim].reshape(h, dim).copy()
            cursor += h * dim
        if cursor != len(body):
            raise ValueError("feature state is truncated or has trailing bytes")
        return cls(
            t_first=t_first,
            t_last=t_last,
            count=header["n"],
            weight_sum=weight_sum,
            weight_sq_sum=weight_sq_sum,
            mass=mass,
            categories=categories,
            heatmap=heatmap,
            event_types=event_types,
            contexts=contexts,
            item_sums=item_sums,
            profile=header["p"],
        )


def item_categories(event: Event, catalogs: Mapping[str, ItemCatalog]) -> tuple[str, ...]:
    """The event's item categories: the first live catalogue's that knows the item, else the
    ones the event carries."""
    for catalog in catalogs.values():
        row = catalog.index.get(event.item_id)
        if row is not None:
            return catalog.categories[row]
    return event.categories
