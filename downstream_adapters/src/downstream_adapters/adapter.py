"""A saved head bound to a client of the version it was trained on.

Example:
    >>> adapter = Adapter.connect("churn.npz", "http://embeddings:8000", api_key="...")
    >>> adapter.predict_proba(["u1", "u2"])

``connect`` pins the client to the head's version and checks the server's manifest first: a
server whose version, dimension or schema hash differs raises
:class:`~downstream_adapters.errors.VersionMismatchError` before any prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from downstream_adapters.artifact import Artifact, load
from downstream_adapters.client import EmbeddingClient

if TYPE_CHECKING:  # the heads need torch; the adapter itself does not
    from downstream_adapters.heads.ood import OODMethod


class Adapter:
    """Predictions for user ids: fetch their embeddings, then apply the head."""

    def __init__(self, artifact: Artifact, client: EmbeddingClient) -> None:
        artifact.pin.check(client.info().pin)
        self.artifact = artifact
        self.client = client

    @classmethod
    def connect(cls, path: str | Path, base_url: str, **client_options: Any) -> Adapter:
        """Load the head at ``path`` and open a client pinned to its version."""
        artifact = load(path)
        return cls(artifact, EmbeddingClient(base_url, expect=artifact.pin, **client_options))

    def _embeddings(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.client.fetch(user_ids)
        return batch.vectors, batch.found

    def predict_proba(self, user_ids: Sequence[str]) -> np.ndarray:
        """Calibrated ``[n, n_classes]`` probabilities; NaN rows for users with no embedding."""
        vectors, found = self._embeddings(user_ids)
        head = self.artifact.head
        out = np.full((len(user_ids), len(head.classes_)), np.nan)
        if found.any():
            out[found] = head.predict_proba(vectors[found])
        return out

    def ood_score(self, user_ids: Sequence[str], method: OODMethod = "knn") -> np.ndarray:
        """OOD score per user (``ClassifierHead.ood_score``); NaN for users with no embedding."""
        vectors, found = self._embeddings(user_ids)
        out = np.full(len(user_ids), np.nan)
        if found.any():
            out[found] = self.artifact.head.ood_score(vectors[found], method)
        return out

    def close(self) -> None:
        self.client.close()
