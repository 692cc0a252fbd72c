"""A model version ready to encode: its ONNX session, schema, catalogue and vectoriser.

This is what ``publish`` and the refresher run; it needs onnxruntime and numpy only. Loading
refuses a manifest whose schema hash differs from the hash this code computes for the same
schema, because that would mean the running feature code lays out inputs differently from the
code the model was trained with, and every embedding would be silently wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.schema import FeatureSchema
from encoder_service.features.state import FeatureState
from encoder_service.features.vectorize import Vectorizer

if TYPE_CHECKING:
    from encoder_service.store import EmbeddingDtype

MODEL_FILE = "encoder.onnx"
CATALOG_FILE = "catalog.npz"
MANIFEST_FILE = "manifest.json"


class SchemaHashMismatchError(RuntimeError):
    """The model was trained on a feature layout this code does not produce."""


@dataclass(frozen=True)
class ModelArtifacts:
    """The three parts of a model version, as bytes and a manifest dict."""

    manifest: dict[str, Any]
    model: bytes
    catalog: bytes

    @classmethod
    def from_folder(cls, folder: Path) -> ModelArtifacts:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        return cls(
            manifest=manifest,
            model=(folder / MODEL_FILE).read_bytes(),
            catalog=(folder / CATALOG_FILE).read_bytes(),
        )


class Encoder:
    """Feature states in, embeddings out, for one model version."""

    def __init__(self, artifacts: ModelArtifacts, *, intra_op_threads: int = 1) -> None:
        manifest = artifacts.manifest
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.schema = FeatureSchema.from_dict(manifest["schema"])
        if self.schema.hash != manifest["schema_hash"]:
            raise SchemaHashMismatchError(
                f"model version {self.version!r} was trained with feature schema "
                f"{manifest['schema_hash']} but this code builds {self.schema.hash}; "
                "retrain the model or run the encoder_service release it was trained with"
            )
        self.catalog = ItemCatalog.from_bytes(artifacts.catalog)
        self.catalog_id = self.catalog.hash
        if manifest.get("catalog_hash") not in (None, self.catalog_id):
            raise SchemaHashMismatchError(
                f"item catalogue of {self.version!r} does not match its manifest "
                f"({manifest.get('catalog_hash')} vs {self.catalog_id})"
            )
        self.dim: int = int(manifest["embedding_dim"])
        self.dtype: EmbeddingDtype = manifest.get("dtype", "float32")
        self.vectorize = Vectorizer(self.schema, self.catalog_id)
        options = ort.SessionOptions()
        # One thread per session: the refresher's batches are small and processes scale out.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            artifacts.model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def encode_features(self, features: np.ndarray) -> np.ndarray:
        """``[n, input_dim]`` float32 -> ``[n, dim]`` float32."""
        if len(features) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self._session.run(None, {self._input: features.astype(np.float32, copy=False)})
        return np.asarray(out, dtype=np.float32)

    def encode_states(self, states: Sequence[FeatureState]) -> np.ndarray:
        return self.encode_features(self.vectorize(states))
