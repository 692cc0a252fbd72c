"""Tests of the training side; the helpers here build a small schema and structured inputs.

The inputs come from a few latent user types, each with its own prototype per segment, so an
autoencoder has real structure to learn and every segment respects its kind: distributions are
non-negative and sum to 1 (or are all zero for users without mass), categoricals are one-hot,
dense segments are real-valued.
"""

from __future__ import annotations

import numpy as np

from encoder_service.features.schema import FeatureSchema, ProfileField, SegmentKind


def tiny_schema(item_vector_dim: int = 8) -> FeatureSchema:
    return FeatureSchema(
        categories=("a", "b", "c"),
        event_types=("view", "buy"),
        contexts=("mobile",),
        profile_fields=(
            ProfileField("age", True, mean=30, std=10),
            ProfileField("g", False, vocabulary=("F", "M")),
        ),
        item_vector_dim=item_vector_dim,
    )


def synthetic_features(
    schema: FeatureSchema, n: int, *, seed: int = 0, n_types: int = 6
) -> np.ndarray:
    """Float32 [n, input_dim] drawn around ``n_types`` latent user types."""
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n)
    x = np.zeros((n, schema.input_dim), dtype=np.float32)
    for group in schema.groups:
        for seg in group.segments:
            w = seg.width
            if seg.kind is SegmentKind.DISTRIBUTION:
                prototypes = rng.dirichlet(np.full(w, 0.3), size=n_types) * 20 + 0.05
                values = np.stack([rng.dirichlet(prototypes[t]) for t in types])
                values[rng.random(n) < 0.1] = 0.0
            elif seg.kind is SegmentKind.CATEGORICAL:
                prototypes = rng.dirichlet(np.full(w, 0.5), size=n_types)
                values = np.eye(w)[[rng.choice(w, p=prototypes[t]) for t in types]]
            else:
                prototypes = rng.normal(0.0, 2.0, size=(n_types, w))
                values = prototypes[types] + rng.normal(0.0, 0.3, size=(n, w))
            x[:, seg.start : seg.end] = values
    return x
