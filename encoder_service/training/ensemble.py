"""Seed ensembles of the autoencoder, distilled back into one encoder.

Two autoencoders trained on the same users from different seeds agree on the broad structure of
the embedding space but each adds its own noise: on MovieLens-100K (943 users) a linear probe on
one seed's embedding scores anywhere in 0.743-0.761 gender AUC and 0.385-0.424 age accuracy.
Averaging the members' embeddings cancels much of that noise, but the members' spaces are
rotated and scaled copies of one another, so they are first brought into one frame by
generalised Procrustes analysis (each member mapped by a rotation and one scale onto the running
mean, a few rounds; Gower 1975). The mean is then layer-normalised like every embedding.

Serving K encoders would cost K times the compute of every refresh, so a single encoder is
distilled instead: a copy of the first member (already close to the mean's frame) is trained to
reproduce the mean embedding from the raw features by mean squared error, with the autoencoder's
own training and validation rows and early stopping. On MovieLens-100K it reaches R² 0.99 of the
mean, and the probe scores of the distilled encoder and of the mean agree within 0.005.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from encoder_service.alignment import procrustes
from encoder_service.training.model import UserEncoder

GPA_ROUNDS = 3
"""Rounds of generalised Procrustes; the mean stops moving after two or three."""

DISTIL_PATIENCE = 10
"""Epochs without a better validation error before distillation stops; regression onto a fixed
target improves slowly but steadily, so it gets more patience than the autoencoder."""

MIN_IMPROVEMENT = 1e-4
"""Relative drop of the validation error that counts as progress while distilling."""


@dataclass
class Distilled:
    """The distilled encoder and how closely it reproduces the ensemble's mean embedding."""

    encoder: UserEncoder
    val_mse: float
    r2: float
    epochs_run: int
    best_epoch: int


def aligned_mean(embeddings: list[np.ndarray], rounds: int = GPA_ROUNDS) -> np.ndarray:
    """The layer-normalised mean of member embeddings [N, E] after generalised Procrustes.

    The first member is the initial frame, so the mean stays close to it and a copy of that
    member is a good starting point for distillation.
    """
    if not embeddings:
        raise ValueError("no member embeddings")
    mean = embeddings[0].astype(np.float64)
    for _ in range(rounds):
        mapped = []
        for member in embeddings:
            weight, bias = procrustes(member.astype(np.float64), mean)
            mapped.append(member @ weight + bias)
        mean = np.mean(mapped, axis=0)
    # The encoder's own final normalisation, so the target is on the scale the student produces.
    return F.layer_norm(torch.from_numpy(mean), (mean.shape[1],)).numpy().astype(np.float32)


def distil(
    start: UserEncoder,
    x: np.ndarray,
    target: np.ndarray,
    val_index: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    seed: int,
) -> Distilled:
    """Train a copy of ``start`` so that it maps raw features ``x`` [N, D] to ``target`` [N, E].

    Rows in ``val_index`` are held out for early stopping; the weights of the best validation
    epoch are returned.
    """
    encoder = copy.deepcopy(start).cpu()
    features, goal = torch.from_numpy(x), torch.from_numpy(target)
    is_val = np.zeros(len(x), dtype=bool)
    is_val[val_index] = True
    train_rows = torch.from_numpy(np.flatnonzero(~is_val))
    val_rows = torch.from_numpy(np.flatnonzero(is_val))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr)
    best_loss, best_epoch = _error(encoder, features, goal, val_rows), 0
    best_state = copy.deepcopy(encoder.state_dict())
    epoch = 0
    for epoch in range(1, epochs + 1):
        encoder.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for start_row in range(0, len(order), batch_size):
            rows = order[start_row : start_row + batch_size]
            loss = F.mse_loss(encoder(features[rows]), goal[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_loss = _error(encoder, features, goal, val_rows)
        if val_loss < best_loss * (1.0 - MIN_IMPROVEMENT):
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(encoder.state_dict())
        elif epoch - best_epoch >= patience:
            break
    encoder.load_state_dict(best_state)
    encoder.eval()
    with torch.no_grad():
        predicted = encoder(features).numpy()
    residual = float(((predicted - target) ** 2).sum())
    total = float(((target - target.mean(axis=0)) ** 2).sum())
    return Distilled(encoder, best_loss, 1.0 - residual / max(total, 1e-12), epoch, best_epoch)


@torch.no_grad()
def _error(
    encoder: UserEncoder, x: torch.Tensor, target: torch.Tensor, rows: torch.Tensor
) -> float:
    encoder.eval()
    return float(F.mse_loss(encoder(x[rows]), target[rows]))
