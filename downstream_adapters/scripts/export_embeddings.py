"""Train an encoder version on MovieLens with the label fields held out, and export every user's
embedding to an ``.npz`` for ``adapters-evaluate --embeddings``, together with the embeddings of
out-of-distribution users encoded by the same version (for the harness's OOD scenario).

This script belongs to the repository, not to the ``downstream-adapters`` distribution: it is
the only place that imports ``encoder_service``, to play the part of a published version. The
profile fields the evaluation predicts (gender, age, occupation) are excluded from the encoder's
input, so no label leaks into the embedding.

    python downstream_adapters/scripts/export_embeddings.py --movielens DIR --out ml100k.npz \\
        [--ciao DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd

from encoder_service.data.ciao import load_ciao
from encoder_service.data.movielens import load_movielens
from encoder_service.data.tables import Dataset
from encoder_service.encoder import Encoder
from encoder_service.features.build import build_states
from encoder_service.features.popularity import POPULARITY_BINS
from encoder_service.training.pipeline import train_version
from encoder_service.training.train import ItemSetTarget, TrainConfig

LABEL_FIELDS = ["gender", "age", "occupation"]
# The evaluation version's encoder: wider item vectors and a heavier item-set weight than the
# service's defaults (docs/evaluation.md, "Wider item vectors").
ITEM_VECTOR_DIM = 128
ITEM_SET_WEIGHT = 100.0
# The item-set reconstruction predicts each film's rating, not only that it was rated, and the
# group branches are up to 256 wide instead of the service's 128 (docs/evaluation.md, "Weighted
# item sets and wider branches").
ITEM_SET_TARGET = "weight"
MAX_BRANCH_WIDTH = 256
# Ten seeds distilled into one encoder (docs/evaluation.md, "Seed ensembles"); the service's
# default is one.
ENSEMBLE_SIZE = 10
BOTS = 300
BOT_EVENTS = (200, 600)
BOT_MINUTES = (2, 15)
CIAO_USERS = 300
CIAO_MIN_EVENTS = 20


def bot_users(dataset: Dataset, rng: np.random.Generator) -> Dataset:
    """Synthetic bots: hundreds of events within minutes of one hour, items drawn uniformly from
    the catalogue, one constant rating each.

    Each bot carries the profile of a random real user, so only its behaviour is out of
    distribution (a missing zip code alone would make it trivially separable).
    """
    items = dataset.items["item_id"].astype(str).to_numpy()
    start, end = dataset.time_window()
    profiles = dataset.users.iloc[rng.integers(0, len(dataset.users), BOTS)].copy()
    profiles["user_id"] = [f"bot{i:04d}" for i in range(BOTS)]
    frames = []
    for user in profiles["user_id"]:
        n = int(rng.integers(*BOT_EVENTS))
        t0 = rng.uniform(start, end - 3600.0)
        span = 60.0 * rng.uniform(*BOT_MINUTES)
        frames.append(
            pd.DataFrame(
                {
                    "user_id": user,
                    "item_id": rng.choice(items, n),
                    "timestamp": np.sort(t0 + rng.uniform(0.0, span, n)),
                    "weight": float(rng.integers(1, 6)),
                }
            )
        )
    return _dataset(dataset, pd.concat(frames, ignore_index=True), profiles, dataset.items, "bots")


def shuffled_users(dataset: Dataset, rng: np.random.Generator) -> Dataset:
    """Every real user with each event's item replaced by one drawn uniformly from the catalogue.

    For a profile model "shuffled history" should break what a profile is about, the coherence
    of *which* items a user chooses, and keep everything else: the same number of events, the
    same timestamps (activity, rhythm) and the same ratings. Shuffling timestamps across users
    would do the opposite (keep a coherent taste, move only the time features), which a profile
    encoder should rightly treat as a plausible user.
    """
    items = dataset.items["item_id"].astype(str).to_numpy()
    events = dataset.events[["user_id", "timestamp", "weight"]].copy()
    events["item_id"] = rng.choice(items, len(events))
    events["user_id"] = "shuffled-" + events["user_id"].astype(str)
    users = dataset.users.assign(user_id="shuffled-" + dataset.users["user_id"].astype(str))
    return _dataset(dataset, events, users, dataset.items, "shuffled")


def ciao_users(dataset: Dataset, ciao_dir: Path, rng: np.random.Generator) -> Dataset:
    """Ciao reviewers through the MovieLens version's input contract.

    Ciao item ids are numbers too, so ids up to 1682 land on MovieLens movies (same number, no
    shared meaning) and get their genres and item vectors; the rest are items the catalogue does
    not know (no categories, the catalogue's fallback vector), as the online path treats them.
    Ciao has no demographics, so the profile is empty.
    """
    ciao = load_ciao(ciao_dir)
    counts = ciao.events["user_id"].value_counts()
    eligible = np.sort(counts.index[counts >= CIAO_MIN_EVENTS].astype(str).to_numpy())
    chosen = rng.choice(eligible, min(CIAO_USERS, len(eligible)), replace=False)
    events = ciao.events[ciao.events["user_id"].astype(str).isin(chosen)]
    events = events[["user_id", "item_id", "timestamp", "weight"]].assign(
        user_id=lambda f: "ciao-" + f["user_id"].astype(str)
    )
    known = set(dataset.items["item_id"].astype(str))
    strangers = sorted(set(events["item_id"].astype(str)) - known)
    items = pd.concat(
        [
            dataset.items,
            pd.DataFrame({"item_id": strangers, "categories": [()] * len(strangers)}).assign(
                vector=None
            ),
        ],
        ignore_index=True,
    )
    users = pd.DataFrame({"user_id": sorted(events["user_id"].unique())})
    for field in dataset.profile_fields():
        users[field] = None
    return _dataset(dataset, events, users, items, "ciao")


def _dataset(
    like: Dataset, events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, name: str
) -> Dataset:
    """Events in the column layout and order :class:`Dataset` promises."""
    frame = events.assign(
        user_id=events["user_id"].astype(str),
        item_id=events["item_id"].astype(str),
        timestamp=events["timestamp"].astype(np.float64),
        weight=events["weight"].astype(np.float64),
        event_type=like.events["event_type"].iloc[0],
        context=None,
    )[list(like.events.columns)]
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    return Dataset(frame, users.reset_index(drop=True), items, name)


def encode(encoder: Encoder, dataset: Dataset) -> np.ndarray:
    """Embeddings of ``dataset``'s users, states built against the version's own catalogue."""
    _, states = build_states(dataset, {encoder.catalog_id: encoder.catalog})
    return encoder.encode_states(states).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--movielens", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ciao", type=Path, help="Ciao folder: also export Ciao users as OOD")
    parser.add_argument("--version", default="ml-eval")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--item-vector-dim", type=int, default=ITEM_VECTOR_DIM)
    parser.add_argument(
        "--item-set-weight",
        type=float,
        default=ITEM_SET_WEIGHT,
        help="item-set reconstruction weight",
    )
    parser.add_argument(
        "--item-set-target",
        choices=get_args(ItemSetTarget),
        default=ITEM_SET_TARGET,
        help="what the item-set reconstruction predicts",
    )
    parser.add_argument(
        "--max-branch-width",
        type=int,
        default=MAX_BRANCH_WIDTH,
        help="widest hidden layer of the feature groups' branches",
    )
    parser.add_argument(
        "--popularity-bins",
        type=int,
        default=POPULARITY_BINS,
        help="item-popularity histogram bins in the features (0: no popularity group)",
    )
    parser.add_argument(
        "--ensemble-size",
        type=int,
        default=ENSEMBLE_SIZE,
        help="autoencoders trained from different seeds and distilled into one encoder",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset = load_movielens(args.movielens)
    config = TrainConfig(
        embedding_dim=args.embedding_dim,
        epochs=args.epochs,
        seed=args.seed,
        item_weight=args.item_set_weight,
        item_set_target=args.item_set_target,
        max_branch_width=args.max_branch_width,
        ensemble_size=args.ensemble_size,
    )
    rng = np.random.default_rng(args.seed)
    ood = {"bot": bot_users(dataset, rng), "shuffled": shuffled_users(dataset, rng)}
    if args.ciao is not None:
        ood["ciao"] = ciao_users(dataset, args.ciao, rng)
    with tempfile.TemporaryDirectory() as folder:
        trained = train_version(
            dataset,
            version=args.version,
            out_dir=Path(folder),
            config=config,
            item_vector_dim=args.item_vector_dim,
            popularity_bins=args.popularity_bins,
            exclude_profile=LABEL_FIELDS,
            progress=False,
        )
        encoder = Encoder(trained.artifacts())
    vectors = encoder.encode_features(trained.features)
    manifest = trained.manifest
    # The layout ``downstream_adapters.evaluate.data.read_npz`` reads; ``state_bytes`` is what
    # the refresher keeps per user beside the embedding, for the harness's cost table.
    np.savez(
        args.out,
        user_ids=np.asarray(trained.user_ids),
        embeddings=vectors.astype(np.float32),
        version=manifest["version"],
        embedding_dim=int(manifest["embedding_dim"]),
        schema_hash=manifest["schema_hash"],
        state_bytes=np.asarray([len(s.to_bytes()) for s in trained.states], dtype=np.int64),
        **{f"ood_{case}": encode(encoder, users) for case, users in ood.items()},
    )
    sizes = ", ".join(f"{case} {len(users.users)}" for case, users in ood.items())
    print(f"{len(trained.user_ids)} users + OOD ({sizes}) -> {args.out} ({manifest['version']})")


if __name__ == "__main__":
    main()
