"""Train the multi-group autoencoder on an in-memory feature matrix.

The whole matrix (100k users x 300 features is 120 MB of float32) stays in one contiguous tensor
and minibatches are gathered by shuffled indices: a DataLoader would add per-sample Python
overhead that costs more than the tiny MLPs themselves. Everything random (the split, the
initial weights, the shuffles, the group dropout) derives from ``TrainConfig.seed``, so the same
data, config and thread count give the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from encoder_service.features.schema import FeatureSchema
from encoder_service.training import distributed, ensemble
from encoder_service.training.model import (
    MAX_BRANCH_WIDTH,
    MultiGroupAutoencoder,
    null_group_losses,
    null_item_loss,
    standardisation_stats,
)

logger = logging.getLogger(__name__)

ItemSetTarget = Literal["presence", "weight"]
"""What the item-set reconstruction predicts: which items a user had events on, or also each
item's mean event weight (see ``pipeline.interaction_matrix``)."""

EVAL_BATCH_SIZE = 8192
"""Rows per forward pass when scoring the validation set; only bounds memory."""

MIN_IMPROVEMENT = 1e-4
"""Relative drop in validation loss that counts as progress for early stopping (losses are >= 0)."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    ``patience`` is the number of epochs without validation improvement before stopping;
    ``num_threads`` sets torch's intra-op threads for the run (``None`` keeps torch's default).
    ``normalise_group_losses`` divides each group's loss by its constant-predictor loss (see
    :mod:`encoder_service.training.model`); ``item_weight`` weighs the item-set reconstruction
    (in units of one normalised group; 0 turns it off), over at most ``max_items`` of the most
    interacted items, and ``item_set_target`` says what it predicts (:data:`ItemSetTarget`).
    ``max_branch_width`` caps the hidden width of each feature group's branches.
    ``ensemble_size`` > 1 trains that many autoencoders from seeds derived
    from ``seed`` and distils their aligned mean embedding into one encoder (see
    :mod:`encoder_service.training.ensemble`): about ``ensemble_size`` times the training time,
    the same serving cost.
    """

    embedding_dim: int = 64
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    group_dropout: float = 0.25
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 0
    num_threads: int | None = None
    normalise_group_losses: bool = True
    item_weight: float = 30.0
    max_items: int = 20_000
    item_set_target: ItemSetTarget = "presence"
    max_branch_width: int = MAX_BRANCH_WIDTH
    ensemble_size: int = 1


@dataclass
class TrainResult:
    """The trained model (best validation epoch, eval mode) and what happened on the way.

    ``history`` has one dict per epoch: ``epoch`` (1-based), ``train_loss`` (with group dropout),
    ``val_loss`` (without), ``val_loss_per_group``, ``train_seconds`` (optimisation only),
    ``train_cpu_seconds`` (this process's CPU time over the same span, all its threads) and
    ``seconds`` (with validation). ``metrics`` describes the returned weights: ``val_loss``,
    ``val_loss_per_group``, ``users_per_second`` (training rows per second of optimisation, over
    all epochs), ``users_per_cpu_second`` (the same per CPU second, which unlike wall time does
    not depend on what else runs on the machine), ``n_train``, ``n_val``, ``best_epoch``,
    ``epochs_run``. ``val_index`` holds the sorted rows of ``x`` held out for validation, so
    downstream evaluations can stay off the users the encoder was fitted on. With an ensemble,
    ``history``, ``best_epoch`` and the loss metrics are the first member's, the model's encoder
    is the distilled one, and ``metrics["ensemble"]`` says how each member did and how closely
    the distilled encoder reproduces the members' mean.
    """

    model: MultiGroupAutoencoder
    history: list[dict[str, Any]]
    best_epoch: int
    metrics: dict[str, Any]
    val_index: np.ndarray


def train_autoencoder(
    x: np.ndarray,
    schema: FeatureSchema,
    config: TrainConfig,
    *,
    items: sp.csr_matrix | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit an autoencoder to the feature matrix ``x`` (float32 [N, D], D = schema.input_dim).

    ``items`` [N, n_items] are the users' interaction weights with the catalogue, the targets of
    the item-set reconstruction (rows aligned with ``x``); without them, or with
    ``config.item_weight == 0``, the model reconstructs the features only. Standardisation and
    loss-scale statistics come from the training split only. Training stops early once the
    validation loss has not improved by ``MIN_IMPROVEMENT`` (relative) for ``config.patience``
    epochs, and the weights of the best epoch are restored.
    """
    x = _check_matrix(np.asarray(x), schema.input_dim)
    if config.ensemble_size < 1:
        raise ValueError("ensemble_size must be >= 1")
    distributed.current().require_same(x, "feature matrix")
    targets = _item_targets(items, len(x), config)
    val_index = _validation_rows(len(x), config)
    is_val = np.zeros(len(x), dtype=bool)
    is_val[val_index] = True
    train = _Split(torch.from_numpy(x[~is_val]), None if targets is None else targets[~is_val])
    val = _Split(torch.from_numpy(x[is_val]), None if targets is None else targets[is_val])
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        model, history, best_epoch = _fit(train, val, schema, config, progress)
        ensemble_report = None
        if config.ensemble_size > 1:
            first_loss = history[best_epoch - 1]["val_loss"]
            ensemble_report = _distil_ensemble(
                model, first_loss, x, train, val, val_index, schema, config, progress
            )
    finally:
        torch.set_num_threads(previous_threads)
    best = history[best_epoch - 1]
    metrics = {
        "val_loss": best["val_loss"],
        "val_loss_per_group": best["val_loss_per_group"],
        "users_per_second": len(train.x) * len(history) / sum(h["train_seconds"] for h in history),
        "users_per_cpu_second": len(train.x)
        * len(history)
        / max(sum(h["train_cpu_seconds"] for h in history), 1e-9),
        "n_train": len(train.x),
        "n_val": len(val.x),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
    }
    if ensemble_report is not None:
        metrics["ensemble"] = ensemble_report
    return TrainResult(model, history, best_epoch, metrics, val_index)


def _distil_ensemble(
    first: MultiGroupAutoencoder,
    first_val_loss: float,
    x: np.ndarray,
    train: _Split,
    val: _Split,
    val_index: np.ndarray,
    schema: FeatureSchema,
    config: TrainConfig,
    progress: bool,
) -> dict[str, Any]:
    """Train the other members, replace ``first``'s encoder by the distilled one, report."""
    embeddings = [_embed(first, x)]
    member_losses = [first_val_loss]
    for member in range(1, config.ensemble_size):
        seed = int(np.random.SeedSequence([config.seed, member]).generate_state(1)[0] >> 1)
        logger.info("ensemble member %d/%d (seed %d)", member + 1, config.ensemble_size, seed)
        member_config = dataclasses.replace(config, seed=seed)
        model, history, best_epoch = _fit(train, val, schema, member_config, progress)
        embeddings.append(_embed(model, x))
        member_losses.append(history[best_epoch - 1]["val_loss"])
    distilled = ensemble.distil(
        first.encoder,
        x,
        ensemble.aligned_mean(embeddings),
        val_index,
        epochs=max(config.epochs, 2 * ensemble.DISTIL_PATIENCE),
        batch_size=config.batch_size,
        lr=config.lr,
        patience=ensemble.DISTIL_PATIENCE,
        seed=config.seed,
    )
    logger.info(
        "distilled %d members: R² %.4f of their mean (val MSE %.4f, epoch %d of %d)",
        *(config.ensemble_size, distilled.r2, distilled.val_mse),
        *(distilled.best_epoch, distilled.epochs_run),
    )
    first.encoder = distilled.encoder
    return {
        "size": config.ensemble_size,
        "member_val_losses": member_losses,
        "distilled_r2": distilled.r2,
        "distilled_val_mse": distilled.val_mse,
        "distill_epochs_run": distilled.epochs_run,
    }


@torch.no_grad()
def _embed(model: MultiGroupAutoencoder, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.concatenate(
        [
            model.encode(torch.from_numpy(x[start : start + EVAL_BATCH_SIZE])).numpy()
            for start in range(0, len(x), EVAL_BATCH_SIZE)
        ]
    )


@dataclass
class _Split:
    """Feature rows and, when the item-set is reconstructed, their item targets."""

    x: torch.Tensor
    items: sp.csr_matrix | None

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.x.index_select(0, rows)
        if self.items is None:
            return x, None
        return x, torch.from_numpy(self.items[rows.cpu().numpy()].toarray()).to(x.device)

    def to(self, device: torch.device) -> _Split:
        return _Split(self.x.to(device), self.items)

    def shard(self, world: distributed.World) -> _Split:
        """This rank's contiguous share of the rows (all of them for a single process)."""
        rows = world.shard(torch.arange(len(self.x)))
        return _Split(self.x[rows], None if self.items is None else self.items[rows.numpy()])


def _item_targets(
    items: sp.csr_matrix | None, n_rows: int, config: TrainConfig
) -> sp.csr_matrix | None:
    """The ``max_items`` most interacted columns of ``items`` as float32 CSR, or None if unused."""
    if items is None or config.item_weight <= 0:
        return None
    if items.shape[0] != n_rows:
        raise ValueError(f"items has {items.shape[0]} rows for {n_rows} feature rows")
    items = sp.csr_matrix(items, dtype=np.float32)
    if items.data.size and (not np.isfinite(items.data).all() or items.data.min() < 0):
        raise ValueError("items must hold finite non-negative interaction weights")
    if items.shape[1] > config.max_items:
        counts = np.asarray((items > 0).sum(axis=0)).ravel()
        keep = np.sort(np.argsort(-counts, kind="stable")[: config.max_items])
        items = items[:, keep]
    return items


def _check_matrix(x: np.ndarray, input_dim: int) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != input_dim:
        raise ValueError(f"x must have shape (N, {input_dim}), got {x.shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    return x


def _validation_rows(n: int, config: TrainConfig) -> np.ndarray:
    """Sorted row indices of a seeded random validation split."""
    n_val = round(n * config.val_fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"val_fraction={config.val_fraction} leaves no train or no validation rows out of {n}"
        )
    return np.sort(np.random.default_rng(config.seed).permutation(n)[:n_val])


def _fit(
    train: _Split,
    val: _Split,
    schema: FeatureSchema,
    config: TrainConfig,
    progress: bool,
) -> tuple[MultiGroupAutoencoder, list[dict[str, Any]], int]:
    """The model with its best weights restored, the per-epoch history and the best epoch."""
    world = distributed.current()
    x_train = train.x.numpy()
    mean, std = standardisation_stats(x_train)
    torch.manual_seed(config.seed)
    generator = torch.Generator(world.device).manual_seed(config.seed + world.rank)
    model = MultiGroupAutoencoder.from_schema(
        schema,
        config.embedding_dim,
        mean=mean,
        std=std,
        group_dropout=config.group_dropout,
        loss_scale=(
            null_group_losses(x_train, schema.groups) if config.normalise_group_losses else None
        ),
        n_items=0 if train.items is None else train.items.shape[1],
        item_weight=config.item_weight,
        item_loss_scale=(
            null_item_loss(train.items)
            if train.items is not None and config.normalise_group_losses
            else 1.0
        ),
        max_branch_width=config.max_branch_width,
    ).to(world.device)
    step = world.loss_fn(model)
    train, val = train.to(world.device), val.shard(world).to(world.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    group_names = [g.name for g in schema.groups] + ([] if train.items is None else ["items"])
    show_progress = progress and world.is_main
    history: list[dict[str, Any]] = []
    best_loss, best_epoch, best_state = float("inf"), 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, config.epochs + 1):
        started, started_cpu = time.perf_counter(), time.process_time()
        order = world.epoch_rows(len(train.x), epoch, config.seed, generator)
        batch_size = world.local_batch_size(config.batch_size)
        train_loss = _train_epoch(
            model, step, optimizer, train, order, batch_size, generator, epoch, show_progress
        )
        (train_loss,) = world.mean([train_loss])
        train_seconds = time.perf_counter() - started
        train_cpu_seconds = time.process_time() - started_cpu
        val_loss, val_groups = evaluate(model, val.x, val.items)
        val_loss, *val_groups = world.mean([val_loss, *val_groups], weight=len(val.x))
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_loss_per_group": dict(zip(group_names, val_groups, strict=True)),
                "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu_seconds,
                "seconds": time.perf_counter() - started,
            }
        )
        logger.info(
            "epoch %d/%d train_loss=%.4f val_loss=%.4f (%.1fs)",
            *(epoch, config.epochs, train_loss, val_loss, history[-1]["seconds"]),
        )
        if val_loss < best_loss * (1.0 - MIN_IMPROVEMENT):
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience:
            logger.info("early stop: no improvement since epoch %d", best_epoch)
            break
    model.load_state_dict(best_state)
    model.eval().cpu()
    return model, history, best_epoch


def _train_epoch(
    model: MultiGroupAutoencoder,
    step: distributed.LossFn,
    optimizer: torch.optim.Optimizer,
    data: _Split,
    order: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    progress: bool,
) -> float:
    """One pass over the rows ``order`` of ``data`` in minibatches; the row-weighted mean loss."""
    model.train()
    total = 0.0
    bar = tqdm(
        range(0, len(order), batch_size),
        desc=f"epoch {epoch}",
        unit="batch",
        leave=False,
        disable=not progress,
    )
    for start in bar:
        batch, items = data.batch(order[start : start + batch_size])
        loss, _ = step(batch, items, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return total / len(order)


@torch.no_grad()
def evaluate(
    model: MultiGroupAutoencoder, x: torch.Tensor, items: sp.csr_matrix | None = None
) -> tuple[float, list[float]]:
    """Row-weighted mean loss and component losses of ``x`` in eval mode (no group dropout).

    The components are the unscaled group losses, then the item-set loss if ``items`` is given.

    Per-batch means are weighted by batch size, which is exact for dense and categorical
    segments and a close approximation for distributions (whose mean is over rows with mass).
    """
    model.eval()
    total = 0.0
    components = len(model.groups) + (items is not None and model.item_decoder is not None)
    groups = torch.zeros(components, dtype=torch.float64)
    for start in range(0, len(x), EVAL_BATCH_SIZE):
        batch = x[start : start + EVAL_BATCH_SIZE]
        targets = None
        if items is not None:
            targets = torch.from_numpy(items[start : start + EVAL_BATCH_SIZE].toarray())
        loss, per_group = model.loss(batch, targets)
        total += loss.item() * len(batch)
        groups += per_group.double().cpu() * len(batch)
    return total / len(x), (groups / len(x)).tolist()
