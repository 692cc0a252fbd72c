"""Publish a model version: encode users with onnxruntime and bulk-load them into Redis.

Order matters for safety. Everything that can be refused is checked before the first write (a
version that exists with another schema is refused up front). Embeddings go under the new
version's own keys, so readers of other versions never see them; the manifest is registered last
and atomically, so a version becomes visible only once complete. If writing fails half-way the
new version's keys are removed again, and the previously published versions are untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import redis
from tqdm import tqdm

from encoder_service.encoder import Encoder, ModelArtifacts
from encoder_service.features.state import FeatureState
from encoder_service.registry import Registry, SchemaMismatchError
from encoder_service.store import EmbeddingStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishReport:
    """What a publish did, for the CLI to print and benchmarks to record."""

    version: str
    users: int
    seconds: float
    active: str | None

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


def publish_version(
    client: redis.Redis,
    artifacts: ModelArtifacts,
    user_ids: Sequence[str],
    states: Sequence[FeatureState],
    *,
    features: np.ndarray | None = None,
    write_states: bool = True,
    activate: bool | None = None,
    batch_size: int = 4096,
    by: str = "cli",
    progress: bool = True,
) -> PublishReport:
    """Encode ``states`` and publish them as ``artifacts``' version.

    Args:
        user_ids / states: aligned; users without events still get an embedding (from their
            profile alone), which is what a cold-start reader expects.
        features: the states already vectorised with this version's schema (the training job
            has them); skips vectorising again, which dominates the cost of a publish.
        write_states: also store each user's feature state (the training snapshot) so the
            refresher continues from it.
        activate: make this the active version; ``None`` activates it only when no version is
            active yet.
    """
    if len(user_ids) != len(states) or (features is not None and len(features) != len(states)):
        raise ValueError("user_ids, states and features must be aligned")
    encoder = Encoder(artifacts)
    registry = Registry(client)
    store = EmbeddingStore(client)
    existing = registry.get(encoder.version)
    if existing is not None and existing["schema_hash"] != artifacts.manifest["schema_hash"]:
        raise SchemaMismatchError(
            f"version {encoder.version!r} is already published with schema "
            f"{existing['schema_hash']}; this model has {artifacts.manifest['schema_hash']}. "
            "Publish it under a new version id."
        )
    started = time.perf_counter()
    try:
        for lo, hi in _batches(len(user_ids), batch_size, progress, "publish"):
            batch_states = states[lo:hi]
            embeddings = (
                encoder.encode_states(batch_states)
                if features is None
                else encoder.encode_features(features[lo:hi])
            )
            store.write_embeddings(
                encoder.version, user_ids[lo:hi], embeddings, dtype=encoder.dtype
            )
            if write_states:
                store.write_states(user_ids[lo:hi], [s.to_bytes() for s in batch_states])
    except BaseException:
        if existing is None:
            log.error("publish of %s failed; removing its partial keys", encoder.version)
            store.delete_version(encoder.version)
        raise
    manifest = {**artifacts.manifest, "published_at": datetime.now(UTC).isoformat()}
    registry.register(manifest, artifacts.model, artifacts.catalog, by=by)
    if activate or (activate is None and registry.active() is None):
        registry.promote(encoder.version, by=by)
    seconds = time.perf_counter() - started
    report = PublishReport(encoder.version, len(user_ids), seconds, registry.active())
    log.info(
        "published %d users as %s in %.1fs (%.0f users/s)",
        report.users,
        report.version,
        seconds,
        report.users_per_second,
    )
    return report


def publish_from_live_states(
    client: redis.Redis,
    artifacts: ModelArtifacts,
    *,
    activate: bool | None = None,
    batch_size: int = 4096,
    by: str = "cli",
    progress: bool = True,
) -> PublishReport:
    """Publish ``artifacts`` for every user whose feature state is in Redis right now."""
    store = EmbeddingStore(client)
    user_ids = list(store.iter_state_users())
    blobs = store.read_states(user_ids)
    pairs = [(u, FeatureState.from_bytes(b)) for u, b in zip(user_ids, blobs, strict=True) if b]
    return publish_version(
        client,
        artifacts,
        [u for u, _ in pairs],
        [s for _, s in pairs],
        write_states=False,
        activate=activate,
        batch_size=batch_size,
        by=by,
        progress=progress,
    )


def _batches(n: int, size: int, progress: bool, label: str) -> Iterable[tuple[int, int]]:
    bar = tqdm(total=n, desc=label, unit="user", disable=not progress, leave=False)
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        yield lo, hi
        bar.update(hi - lo)
    bar.close()
