"""The item catalogue a model version ships: item categories and item vectors.

The refresher must turn an event about an item into exactly the contribution the training job
computed, so the categories and vectors travel with the version instead of being looked up in a
live database that may have moved on. An item the catalogue does not know still gets a defined
vector: the mean of its categories' vectors when the event names categories, else the mean of all.

A catalogue may end its vectors with popularity coordinates (``features.popularity``); an
unknown item then takes the taste part of its vector as above and the *cold* popularity
coordinates, since nobody interacted with it when the catalogue was built.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoder_service.data.contract import CATEGORY_SEPARATOR


@dataclass(frozen=True)
class ItemCatalog:
    """Item ids, their categories and float32 vectors ``[n_items, dim]``, plus fallbacks.

    ``cold_popularity`` are the popularity coordinates of an item without training events; when
    given, the last ``len(cold_popularity)`` columns of ``vectors`` are popularity coordinates.
    """

    item_ids: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    vectors: np.ndarray
    cold_popularity: tuple[float, ...] = ()
    index: dict[str, int] = field(init=False, repr=False, compare=False)
    category_vectors: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)
    mean_vector: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.categories) or len(self.item_ids) != len(self.vectors):
            raise ValueError("item_ids, categories and vectors must have the same length")
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError("vectors must be a 2-D array [n_items, dim]")
        if len(self.cold_popularity) > vectors.shape[1]:
            raise ValueError("cold_popularity is wider than the vectors")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "cold_popularity", tuple(float(v) for v in self.cold_popularity))
        object.__setattr__(self, "index", {item: i for i, item in enumerate(self.item_ids)})
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for row, names in enumerate(self.categories):
            for name in names:
                if name in sums:
                    sums[name] += vectors[row]
                    counts[name] += 1
                else:
                    sums[name] = vectors[row].astype(np.float64)
                    counts[name] = 1
        object.__setattr__(
            self,
            "category_vectors",
            {name: self._cold((sums[name] / counts[name]).astype(np.float32)) for name in sums},
        )
        mean = vectors.mean(axis=0) if len(vectors) else np.zeros(vectors.shape[1], np.float32)
        object.__setattr__(self, "mean_vector", self._cold(mean.astype(np.float32)))

    def _cold(self, vector: np.ndarray) -> np.ndarray:
        """A fallback vector with its popularity coordinates set to the cold ones."""
        if self.cold_popularity:
            vector[self.taste_dim :] = self.cold_popularity
        return vector

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def popularity_width(self) -> int:
        """Trailing popularity coordinates of every vector (0: none)."""
        return len(self.cold_popularity)

    @property
    def taste_dim(self) -> int:
        """Leading coordinates that describe the item itself: its vector (content or
        co-occurrence), then its attributes when the catalogue has any."""
        return self.dim - self.popularity_width

    def lookup(
        self, item_id: str, categories: Sequence[str] = ()
    ) -> tuple[tuple[str, ...], np.ndarray]:
        """Categories and vector of an item; unknown items fall back as the module says."""
        row = self.index.get(item_id)
        if row is not None:
            return self.categories[row], self.vectors[row]
        known = [self.category_vectors[c] for c in categories if c in self.category_vectors]
        vector = np.mean(known, axis=0).astype(np.float32) if known else self.mean_vector
        return tuple(categories), vector

    def to_bytes(self) -> bytes:
        """An ``.npz`` without pickles, so loading a catalogue can never execute code."""
        buffer = io.BytesIO()
        # Any: savez_compressed's keyword arguments include ``allow_pickle``, so mypy cannot
        # tell a str-keyed dict of arrays from one that sets it.
        popularity: dict[str, Any] = (
            {"cold_popularity": np.asarray(self.cold_popularity, dtype=np.float64)}
            if self.cold_popularity
            else {}
        )
        np.savez_compressed(
            buffer,
            item_ids=np.array(self.item_ids, dtype=np.str_),
            categories=np.array(
                [CATEGORY_SEPARATOR.join(c) for c in self.categories], dtype=np.str_
            ),
            vectors=self.vectors,
            **popularity,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ItemCatalog:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            ids = tuple(str(i) for i in npz["item_ids"])
            cats = tuple(
                tuple(c for c in str(joined).split(CATEGORY_SEPARATOR) if c)
                for joined in npz["categories"]
            )
            vectors = npz["vectors"]
            cold = tuple(npz["cold_popularity"].tolist()) if "cold_popularity" in npz else ()
        return cls(item_ids=ids, categories=cats, vectors=vectors, cold_popularity=cold)

    @property
    def hash(self) -> str:
        """Content hash; feature states key their item-vector sums by it."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.item_ids).encode())
        digest.update("\n".join(CATEGORY_SEPARATOR.join(c) for c in self.categories).encode())
        digest.update(self.vectors.tobytes())
        if self.cold_popularity:  # catalogues without popularity keep the hash they had
            digest.update(np.asarray(self.cold_popularity, dtype=np.float64).tobytes())
        return "sha256:" + digest.hexdigest()[:32]
