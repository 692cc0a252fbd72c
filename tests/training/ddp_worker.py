"""One rank of the DDP test, started by ``torchrun``: trains on synthetic users and reports.

Each rank writes ``rank<N>.json`` with what the test checks: the validation loss, the epochs run,
a digest of the final weights (equal on every rank when gradients are really averaged) and the
rows the rank was given in the first epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from encoder_service.data.synthetic import generate
from encoder_service.training import distributed
from encoder_service.training.pipeline import prepare_features
from encoder_service.training.train import TrainConfig, train_autoencoder


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
