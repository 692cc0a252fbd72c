"""The feature schema: which groups a feature vector holds, in what order, and its hash.

The schema is fitted once on the training data (vocabularies of categories, event types,
contexts and profile values) and then frozen inside a model version. The encoder's input layout
is a pure function of the schema, so its hash is what the API, the refresher and the adapters
compare to refuse a model whose input they would build differently.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import orjson

SCHEMA_FORMAT = 1
"""Bumped whenever the vectorisation code changes meaning, so old manifests stop matching."""

HALF_LIVES_DAYS: tuple[float, ...] = (7.0, 60.0, 365.0)
"""Short, medium and long-term memory of the decayed aggregates."""

RHYTHM_HALF_LIFE_DAYS = 365.0
"""The time-heatmap and the label distributions use the long memory."""

HEATMAP_CELLS = 7 * 24
OTHER = "__other__"
UNKNOWN = "__unknown__"


class SegmentKind(StrEnum):
    """How a slice of the feature vector is distributed, which decides its reconstruction loss."""

    DISTRIBUTION = "distribution"
    """Non-negative, sums to 1 (or all zero when the user has no mass): cross-entropy / KL."""
    CATEGORICAL = "categorical"
    """One-hot over a vocabulary including an explicit unknown: cross-entropy."""
    DENSE = "dense"
    """Real values: mean squared error after standardisation."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A contiguous slice ``[start, end)`` of the feature vector with one loss."""

    name: str
    kind: SegmentKind
    start: int
    end: int

    @property
    def width(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Group:
    """A named feature group; the autoencoder gives each its own encoder and decoder branch."""

    name: str
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def end(self) -> int:
        return self.segments[-1].end


@dataclass(frozen=True, slots=True)
class ProfileField:
    """A profile column: numeric (standardised with a missing flag) or categorical (one-hot)."""

    name: str
    numeric: bool
    vocabulary: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class FeatureSchema:
    """Everything needed to turn a feature state into the encoder's input vector."""

    categories: tuple[str, ...]
    event_types: tuple[str, ...]
    contexts: tuple[str, ...]
    profile_fields: tuple[ProfileField, ...]
    item_vector_dim: int
    item_attributes: tuple[str, ...] = ()
    """Numeric item attributes whose weighted means enter the ``item_attributes`` group; the
    catalogue's vectors hold them, standardised, right after the item vector."""
    popularity_bins: int = 0
    """Bins of the item-popularity histogram (``features.popularity``); 0: no popularity group."""
    half_lives_days: tuple[float, ...] = HALF_LIVES_DAYS
    rhythm_half_life_days: float = RHYTHM_HALF_LIFE_DAYS
    format: int = SCHEMA_FORMAT
    groups: tuple[Group, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(_layout(self)))

    @property
    def input_dim(self) -> int:
        return self.groups[-1].end if self.groups else 0

    @property
    def popularity_width(self) -> int:
        """Popularity coordinates per item vector: the bins' one-hot and the log count."""
        return self.popularity_bins + 1 if self.popularity_bins else 0

    @property
    def category_slots(self) -> tuple[str, ...]:
        """Category vocabulary plus the bucket for categories seen only after training."""
        return (*self.categories, OTHER)

    @property
    def event_type_slots(self) -> tuple[str, ...]:
        return (*self.event_types, OTHER)

    @property
    def context_slots(self) -> tuple[str, ...]:
        return (*self.contexts, OTHER, UNKNOWN)

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; ``groups`` is included for readers, not for rebuilding."""
        data = {
            "format": self.format,
            "categories": list(self.categories),
            "event_types": list(self.event_types),
            "contexts": list(self.contexts),
            "profile_fields": [asdict(f) for f in self.profile_fields],
            "item_vector_dim": self.item_vector_dim,
            "half_lives_days": list(self.half_lives_days),
            "rhythm_half_life_days": self.rhythm_half_life_days,
        }
        # schemas without attributes or popularity keep the hash they had
        if self.item_attributes:
            data["item_attributes"] = list(self.item_attributes)
        if self.popularity_bins:
            data["popularity_bins"] = self.popularity_bins
        data["groups"] = [
            {
                "name": g.name,
                "segments": [
                    {"name": s.name, "kind": str(s.kind), "start": s.start, "end": s.end}
                    for s in g.segments
                ],
            }
            for g in self.groups
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSchema:
        return cls(
            categories=tuple(data["categories"]),
            event_types=tuple(data["event_types"]),
            contexts=tuple(data["contexts"]),
            profile_fields=tuple(
                ProfileField(
                    name=f["name"],
                    numeric=f["numeric"],
                    vocabulary=tuple(f.get("vocabulary", ())),
                    mean=f.get("mean", 0.0),
                    std=f.get("std", 1.0),
                )
                for f in data["profile_fields"]
            ),
            item_vector_dim=data["item_vector_dim"],
            item_attributes=tuple(data.get("item_attributes", ())),
            popularity_bins=data.get("popularity_bins", 0),
            half_lives_days=tuple(data["half_lives_days"]),
            rhythm_half_life_days=data["rhythm_half_life_days"],
            format=data["format"],
        )

    @property
    def hash(self) -> str:
        """SHA-256 over the canonical JSON of everything that decides the input vector."""
        canonical = orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)
        return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _layout(schema: FeatureSchema) -> list[Group]:
    """Assign each group its slice; the order here is the order of the input vector."""
    groups: list[Group] = []
    cursor = 0

    def segment(name: str, kind: SegmentKind, width: int) -> Segment:
        nonlocal cursor
        seg = Segment(name, kind, cursor, cursor + width)
        cursor += width
        return seg

    horizons = [f"{int(h)}d" for h in schema.half_lives_days]
    n_cat = len(schema.category_slots)
    groups.append(
        Group(
            "affinity",
            tuple(segment(f"affinity_{h}", SegmentKind.DISTRIBUTION, n_cat) for h in horizons),
        )
    )
    if schema.item_vector_dim > 0:
        groups.append(
            Group(
                "item_taste",
                tuple(
                    segment(f"item_taste_{h}", SegmentKind.DENSE, schema.item_vector_dim)
                    for h in horizons
                ),
            )
        )
    if schema.item_attributes:
        width = len(schema.item_attributes)
        groups.append(
            Group(
                "item_attributes",
                tuple(segment(f"item_attributes_{h}", SegmentKind.DENSE, width) for h in horizons),
            )
        )
    if schema.popularity_bins > 0:
        histograms = tuple(
            segment(f"popularity_{h}", SegmentKind.DISTRIBUTION, schema.popularity_bins)
            for h in horizons
        )
        log_count = segment("popularity_log_count", SegmentKind.DENSE, len(horizons))
        groups.append(Group("popularity", (*histograms, log_count)))
    groups.append(
        Group("activity", (segment("activity", SegmentKind.DENSE, activity_width(schema)),))
    )
    groups.append(Group("rhythm", (segment("heatmap", SegmentKind.DISTRIBUTION, HEATMAP_CELLS),)))
    context_segments: list[Segment] = []
    if len(schema.event_types) > 1:
        context_segments.append(
            segment("event_type", SegmentKind.DISTRIBUTION, len(schema.event_type_slots))
        )
    if schema.contexts:
        context_segments.append(
            segment("context", SegmentKind.DISTRIBUTION, len(schema.context_slots))
        )
    if context_segments:
        groups.append(Group("context", tuple(context_segments)))
    profile_segments: list[Segment] = []
    for f in schema.profile_fields:
        if f.numeric:
            profile_segments.append(segment(f"profile.{f.name}", SegmentKind.DENSE, 2))
        else:
            width = len(f.vocabulary) + 2  # + other + unknown
            profile_segments.append(segment(f"profile.{f.name}", SegmentKind.CATEGORICAL, width))
    if profile_segments:
        groups.append(Group("profile", tuple(profile_segments)))
    return groups


def activity_width(schema: FeatureSchema) -> int:
    """log1p count, log1p mass per half-life, log1p span and mean gap, weight mean and std."""
    return 1 + len(schema.half_lives_days) + 2 + 2
