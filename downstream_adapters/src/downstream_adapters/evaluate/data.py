"""The inputs of an evaluation: interaction events, item categories, labels, and embeddings.

The harness never trains or imports the encoder: embeddings come from a running service or from
an ``.npz`` file (``user_ids``, ``embeddings``, ``version``, ``embedding_dim``, ``schema_hash``).
The raw tables are read here only to build the baselines the embedding must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from downstream_adapters.client import EmbeddingClient
from downstream_adapters.wire import Pin

AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
"""The MovieLens-1M age groups, applied to 100K's exact ages."""
_AGE_EDGES = [18, 25, 35, 45, 50, 56]


@dataclass
class Tables:
    """``events``: user_id, item_id, timestamp (unix s), weight; ``item_categories``: item_id ->
    tuple of names; ``labels``: one column per task, indexed by user_id (NaN when unknown)."""

    events: pd.DataFrame
    item_categories: dict[str, tuple[str, ...]]
    labels: pd.DataFrame


@dataclass
class EmbeddingSet:
    user_ids: list[str]
    vectors: np.ndarray
    pin: Pin

    def align(self, user_ids: list[str]) -> np.ndarray:
        """Rows for ``user_ids``; raises if any has no embedding."""
        index = pd.Index(self.user_ids).get_indexer(user_ids)
        if (index < 0).any():
            missing = [u for u, i in zip(user_ids, index, strict=True) if i < 0][:5]
            raise ValueError(f"no embedding for {int((index < 0).sum())} users, e.g. {missing}")
        return self.vectors[index]


def age_bucket(age: pd.Series) -> pd.Series:
    codes = np.digitize(age.to_numpy(dtype=float), _AGE_EDGES)
    return pd.Series(np.asarray(AGE_BUCKETS)[codes], index=age.index).where(age.notna())


def read_movielens_100k(folder: Path) -> Tables:
    """``u.data``, ``u.item`` genres and ``u.user`` labels: gender, age bucket, occupation."""
    events = pd.read_csv(
        folder / "u.data", sep="\t", names=["user_id", "item_id", "weight", "timestamp"], dtype=str
    )
    events = events.astype({"weight": float, "timestamp": float})
    genres = pd.read_csv(folder / "u.genre", sep="|", names=["name", "code"])["name"].tolist()
    items = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1", dtype=str)
    flags = items.iloc[:, 5 : 5 + len(genres)].astype(int).to_numpy() == 1
    categories = {
        str(item): tuple(np.asarray(genres)[row]) for item, row in zip(items[0], flags, strict=True)
    }
    users = pd.read_csv(
        folder / "u.user",
        sep="|",
        names=["user_id", "age", "gender", "occupation", "zip"],
        dtype=str,
    ).set_index("user_id")
    labels = pd.DataFrame(
        {
            "gender": users["gender"],
            "age": age_bucket(users["age"].astype(float)),
            "occupation": users["occupation"],
        }
    )
    return Tables(events, categories, labels)


def read_tables(events: Path, labels: Path, items: Path | None = None) -> Tables:
    """Generic CSVs: events (user_id, item_id, timestamp, optional weight), labels (user_id plus
    one column per task), items (item_id, categories joined by ``|``)."""
    frame = pd.read_csv(events, dtype={"user_id": str, "item_id": str})
    if "weight" not in frame:
        frame["weight"] = 1.0
    categories: dict[str, tuple[str, ...]] = {}
    if items is not None:
        table = pd.read_csv(items, dtype=str).fillna("")
        categories = {
            i: tuple(c for c in cats.split("|") if c)
            for i, cats in zip(table["item_id"], table["categories"], strict=True)
        }
    label_frame = pd.read_csv(labels, dtype={"user_id": str}).set_index("user_id")
    return Tables(frame[["user_id", "item_id", "timestamp", "weight"]], categories, label_frame)


def read_npz(path: Path) -> EmbeddingSet:
    with np.load(path, allow_pickle=False) as data:
        pin = Pin(str(data["version"]), int(data["embedding_dim"]), str(data["schema_hash"]))
        return EmbeddingSet([str(u) for u in data["user_ids"]], data["embeddings"], pin)


def write_npz(path: Path, embeddings: EmbeddingSet) -> None:
    np.savez(
        path,
        user_ids=np.asarray(embeddings.user_ids),
        embeddings=embeddings.vectors.astype(np.float32),
        version=embeddings.pin.version,
        embedding_dim=embeddings.pin.dim,
        schema_hash=embeddings.pin.schema_hash,
    )


def fetch_from_service(client: EmbeddingClient, user_ids: list[str]) -> EmbeddingSet:
    batch = client.fetch(user_ids)
    found = batch.found
    ids = [u for u, ok in zip(user_ids, found, strict=True) if ok]
    return EmbeddingSet(ids, batch.vectors[found], client.info().pin)


def read_npz_extras(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The optional arrays of an export: ``ood_<case>`` embeddings of out-of-distribution users
    encoded by the same version, and ``state_bytes`` (the service's per-user state size)."""
    with np.load(path, allow_pickle=False) as data:
        ood = {k.removeprefix("ood_"): data[k] for k in data.files if k.startswith("ood_")}
        return ood, data["state_bytes"] if "state_bytes" in data.files else None
