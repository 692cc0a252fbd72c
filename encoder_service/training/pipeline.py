"""The training job end to end: tables -> states -> features -> autoencoder -> ONNX version folder.

The output folder holds everything a model version is (``encoder.onnx``, ``catalog.npz``,
``manifest.json``); the in-memory states and features come back too so that the caller can
publish the snapshot without rebuilding it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import scipy.sparse as sp

from encoder_service.data.tables import Dataset
from encoder_service.encoder import CATALOG_FILE, MODEL_FILE, ModelArtifacts
from encoder_service.features.build import build_catalog, build_states, fit_schema
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.schema import FeatureSchema
from encoder_service.features.state import FeatureState
from encoder_service.features.vectorize import Vectorizer
from encoder_service.training import distributed
from encoder_service.training.export import (
    build_manifest,
    check_parity,
    export_encoder,
    write_manifest,
)
from encoder_service.training.item_vectors import learn_item_vectors
from encoder_service.training.model import MultiGroupAutoencoder
from encoder_service.training.train import ItemSetTarget, TrainConfig, train_autoencoder

log = logging.getLogger(__name__)

PARITY_SAMPLE = 4096
CONTENT_VECTOR_MIN_COVERAGE = 0.5


@dataclass
class TrainedVersion:
    """A trained version plus the snapshot it was trained on.

    The artefacts are held in memory as well as written to ``folder``: under torchrun only rank 0
    writes the folder, and ranks on other machines publish from the copy they were sent.
    """

    folder: Path
    manifest: dict[str, Any]
    user_ids: list[str]
    states: list[FeatureState]
    features: np.ndarray
    exported: ModelArtifacts

    def artifacts(self) -> ModelArtifacts:
        return self.exported


@dataclass
class PreparedFeatures:
    """A data set turned into the encoder's inputs, before any training.

    ``interactions`` [users, items] are the targets of the item-set reconstruction (see
    :func:`interaction_matrix`; rows in ``user_ids`` order, columns in ``dataset.items`` order),
    used by training only.
    """

    schema: FeatureSchema
    catalog: ItemCatalog
    user_ids: list[str]
    states: list[FeatureState]
    features: np.ndarray
    interactions: sp.csr_matrix


def prepare_features(
    dataset: Dataset,
    *,
    item_vector_dim: int = 32,
    popularity_bins: int = 0,
    exclude_profile: Sequence[str] = (),
    seed: int = 0,
    item_set_target: ItemSetTarget = "presence",
) -> PreparedFeatures:
    """Item vectors, catalogue, schema, every user's state and the feature matrix.

    The catalogue's vectors are the item vectors, then the items' numeric attributes, then
    (``popularity_bins`` > 0) their popularity coordinates (see ``features.popularity``).
    """
    vectors = _item_vectors(dataset, item_vector_dim, seed)
    catalog = build_catalog(dataset, vectors, popularity_bins)
    schema = fit_schema(
        dataset,
        item_vector_dim=vectors.shape[1],
        popularity_bins=popularity_bins,
        exclude_profile=exclude_profile,
    )
    log.info(
        "feature schema %s: %d inputs in %d groups",
        schema.hash[:19],
        schema.input_dim,
        len(schema.groups),
    )
    user_ids, states = build_states(dataset, {catalog.hash: catalog})
    features = Vectorizer(schema, catalog.hash)(states)
    interactions = interaction_matrix(dataset, user_ids, item_set_target)
    return PreparedFeatures(schema, catalog, user_ids, states, features, interactions)


def interaction_matrix(
    dataset: Dataset, user_ids: Sequence[str], target: ItemSetTarget = "presence"
) -> sp.csr_matrix:
    """Float32 [users, items], the item-set reconstruction's targets; 0 where no event.

    ``presence`` is 1 where the user has any event on the item: the reconstruction is about
    *which* items (as in Mult-DAE). ``weight`` is the mean weight of the user's events on the
    item, so with ratings a loved film counts five times a disliked one and the embedding keeps
    some of how much, which on MovieLens-100K lifted gender and age (docs/evaluation.md); a mean
    rather than a sum, so repeat views do not let one item dominate a user's row. With implicit
    feedback, every weight 1, the two agree.
    """
    if target not in get_args(ItemSetTarget):
        raise ValueError(f"item-set target must be 'presence' or 'weight', not {target!r}")
    users = pd.Index(list(user_ids))
    items = pd.Index(dataset.items["item_id"].astype(str))
    rows = users.get_indexer(dataset.events["user_id"].astype(str))
    cols = items.get_indexer(dataset.events["item_id"].astype(str))
    known = (rows >= 0) & (cols >= 0)
    coordinates = (rows[known], cols[known])
    shape = (len(users), len(items))
    counts = sp.csr_matrix((np.ones(int(known.sum()), np.float32), coordinates), shape=shape)
    counts.sum_duplicates()
    if target == "presence":
        counts.data[:] = 1.0
        return counts
    weights = dataset.events["weight"].to_numpy(np.float32)[known]
    sums = sp.csr_matrix((weights, coordinates), shape=shape)
    sums.sum_duplicates()
    return sp.csr_matrix((sums.data / counts.data, sums.indices, sums.indptr), shape=shape)


def train_version(
    dataset: Dataset,
    *,
    version: str,
    out_dir: Path,
    config: TrainConfig,
    item_vector_dim: int = 32,
    popularity_bins: int = 0,
    exclude_profile: Sequence[str] = (),
    parent_version: str | None = None,
    progress: bool = True,
) -> TrainedVersion:
    """Train and export one model version into ``out_dir / version``.

    Under torchrun every rank trains its share and rank 0 alone exports (see ``distributed``).
    """
    prepared = prepare_features(
        dataset,
        item_vector_dim=item_vector_dim,
        popularity_bins=popularity_bins,
        exclude_profile=exclude_profile,
        seed=config.seed,
        item_set_target=config.item_set_target,
    )
    result = train_autoencoder(
        prepared.features,
        prepared.schema,
        config,
        items=prepared.interactions,
        progress=progress,
    )
    folder = out_dir / version
    world = distributed.current()
    artifacts = world.on_main(
        lambda: _export(
            result.model,
            {**result.metrics, "training_processes": world.size},
            prepared,
            dataset,
            folder=folder,
            version=version,
            config=config,
            exclude_profile=exclude_profile,
            parent_version=parent_version,
        )
    )
    return TrainedVersion(
        folder,
        artifacts.manifest,
        prepared.user_ids,
        prepared.states,
        prepared.features,
        artifacts,
    )


def _export(
    model: MultiGroupAutoencoder,
    metrics: dict[str, Any],
    prepared: PreparedFeatures,
    dataset: Dataset,
    *,
    folder: Path,
    version: str,
    config: TrainConfig,
    exclude_profile: Sequence[str],
    parent_version: str | None,
) -> ModelArtifacts:
    """Write ``encoder.onnx``, ``catalog.npz`` and ``manifest.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    schema, catalog, features = prepared.schema, prepared.catalog, prepared.features
    model_path = export_encoder(model, folder / MODEL_FILE, input_dim=schema.input_dim)
    sample = np.random.default_rng(config.seed).permutation(len(features))[:PARITY_SAMPLE]
    parity = check_parity(model, model_path, features[np.sort(sample)])
    (folder / CATALOG_FILE).write_bytes(catalog.to_bytes())
    start, end = dataset.time_window()
    manifest = build_manifest(
        version=version,
        schema=schema,
        embedding_dim=config.embedding_dim,
        catalog_hash=catalog.hash,
        dataset_summary={
            "data": dataset.name,
            "window_start": _iso(start),
            "window_end": _iso(end),
            "n_users": len(prepared.user_ids),
            "n_events": len(dataset.events),
            "n_items": len(dataset.items),
            "excluded_profile_fields": list(exclude_profile),
            "item_set_weight": config.item_weight,
            "item_set_target": config.item_set_target,
            "max_branch_width": config.max_branch_width,
        },
        metrics={**metrics, "onnx_parity_max_abs_diff": parity},
        parent_version=parent_version,
    )
    write_manifest(manifest, folder)
    log.info("model version %s written to %s", version, folder)
    return ModelArtifacts.from_folder(folder)


def _item_vectors(dataset: Dataset, dim: int, seed: int) -> np.ndarray:
    """Content vectors where the catalogue has them, else vectors learned from co-occurrence."""
    content = _content_vectors(dataset.items)
    if content is not None:
        log.info("using the catalogue's content vectors (%d dims)", content.shape[1])
        return content
    items = pd.Index(dataset.items["item_id"].astype(str))
    users = pd.Index(dataset.users["user_id"].astype(str))
    log.info("learning %d-dim item vectors from co-occurrence of %d items", dim, len(items))
    return learn_item_vectors(
        users.get_indexer(dataset.events["user_id"].astype(str)),
        items.get_indexer(dataset.events["item_id"].astype(str)),
        len(items),
        dim,
        seed=seed,
    )


def _content_vectors(items: pd.DataFrame) -> np.ndarray | None:
    """Stack content vectors when enough items carry one; the rest take their categories' mean."""
    column = items["vector"]
    present = column.notna().to_numpy()
    if not len(items) or present.mean() < CONTENT_VECTOR_MIN_COVERAGE:
        return None
    known = np.stack(column[present].to_list()).astype(np.float32)
    vectors = np.zeros((len(items), known.shape[1]), dtype=np.float32)
    vectors[present] = known
    if (~present).any():
        by_category: dict[str, list[np.ndarray]] = {}
        for cats, vector in zip(items["categories"][present], known, strict=True):
            for name in cats:
                by_category.setdefault(name, []).append(vector)
        means = {name: np.mean(v, axis=0) for name, v in by_category.items()}
        fallback = known.mean(axis=0)
        for row in np.flatnonzero(~present):
            found = [means[c] for c in items["categories"].iloc[row] if c in means]
            vectors[row] = np.mean(found, axis=0) if found else fallback
    return vectors


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()
