"""One rank of the DDP tests, started by ``torchrun``.

``train``: trains on synthetic users; each rank writes ``rank<N>.json`` with what the test
checks: the validation loss, the epochs run, a digest of the final weights (equal on every rank
when gradients are really averaged) and the rows the rank was given in the first epoch.

``publish``: trains a small version and publishes its snapshot to ``--redis-url``, each rank its
slice; ``--break-rank R`` plants an invalid user id at the end of rank R's slice, so that rank
fails after writing part of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from encoder_service.data.synthetic import generate
from encoder_service.redis_connection import sync_client
from encoder_service.training import distributed
from encoder_service.training.pipeline import prepare_features, train_version
from encoder_service.training.train import TrainConfig, train_autoencoder


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "publish"])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--redis-url")
    parser.add_argument("--break-rank", type=int, default=-1)
    args = parser.parse_args()
    if args.mode == "publish":
        publish(args)
        return
    prepared = prepare_features(generate(args.users, seed=args.seed), item_vector_dim=8, seed=0)
    config = TrainConfig(
        embedding_dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed
    )
    with distributed.launched() as world:
        first_epoch_rows = world.epoch_rows(100, 1, args.seed, torch.Generator()).tolist()
        result = train_autoencoder(prepared.features, prepared.schema, config, progress=False)
    report = {
        "rank": world.rank,
        "size": world.size,
        "backend": world.backend,
        "val_loss": result.metrics["val_loss"],
        "epochs_run": result.metrics["epochs_run"],
        "weights": weights_digest(result.model),
        "first_epoch_rows": first_epoch_rows,
    }
    (args.out / f"rank{world.rank}.json").write_text(json.dumps(report))


def publish(args: argparse.Namespace) -> None:
    config = TrainConfig(
        embedding_dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed
    )
    with distributed.launched() as world:
        trained = train_version(
            generate(args.users, seed=args.seed),
            version="v1",
            out_dir=args.out,
            config=config,
            item_vector_dim=8,
            progress=False,
        )
        if world.rank == args.break_rank:
            trained.user_ids[-1] = "not a valid id"
        distributed.publish_snapshot(
            sync_client(args.redis_url), trained, activate=None, batch_size=50, progress=False
        )


if __name__ == "__main__":
    main()
