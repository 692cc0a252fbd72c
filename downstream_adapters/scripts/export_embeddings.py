"""Train an encoder version on MovieLens with the label fields held out, and export every user's
embedding to an ``.npz`` for ``adapters-evaluate --embeddings``.

This script belongs to the repository, not to the ``downstream-adapters`` distribution: it is
the only place that imports ``encoder_service``, to play the part of a published version. The
profile fields the evaluation predicts (gender, age, occupation) are excluded from the encoder's
input, so no label leaks into the embedding.

    python downstream_adapters/scripts/export_embeddings.py --movielens DIR --out ml100k.npz
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from encoder_service.data.movielens import load_movielens
from encoder_service.encoder import Encoder
from encoder_service.training.pipeline import train_version
from encoder_service.training.train import TrainConfig

LABEL_FIELDS = ["gender", "age", "occupation"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--movielens", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", default="ml-eval")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--item-vector-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset = load_movielens(args.movielens)
    config = TrainConfig(embedding_dim=args.embedding_dim, epochs=args.epochs, seed=args.seed)
    with tempfile.TemporaryDirectory() as folder:
        trained = train_version(
            dataset,
            version=args.version,
            out_dir=Path(folder),
            config=config,
            item_vector_dim=args.item_vector_dim,
            exclude_profile=LABEL_FIELDS,
            progress=False,
        )
        vectors = Encoder(trained.artifacts()).encode_features(trained.features)
    manifest = trained.manifest
    # The layout ``downstream_adapters.evaluate.data.read_npz`` reads.
    np.savez(
        args.out,
        user_ids=np.asarray(trained.user_ids),
        embeddings=vectors.astype(np.float32),
        version=manifest["version"],
        embedding_dim=int(manifest["embedding_dim"]),
        schema_hash=manifest["schema_hash"],
    )
    print(f"{len(trained.user_ids)} users -> {args.out} ({manifest['version']})")


if __name__ == "__main__":
    main()
