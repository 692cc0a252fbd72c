"""The student and teacher network: a small MLP scoring one (user, item) sample (``torch`` extra).

Training runs a fixed budget of minibatch steps whatever the data size (a target domain of a
thousand samples and an entire space of a million get the same loop), evaluates the target's
validation log-loss every ``eval_every`` steps and keeps the best weights, so early stopping
always looks at the domain the model is for. ``fit(..., warm_start=True)`` continues from the
current weights and input scaling: the continual mode of the adapter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from downstream_adapters.crossdomain.distill import distillation_loss


@dataclass(frozen=True)
class Distillation:
    """What the student distils: ``strength`` is lambda, ``temperature`` tau (see ``distill``)."""

    teacher_logit: np.ndarray
    strength: float = 1.0
    temperature: float = 0.5
    adaptive: bool = True


class BinaryMLP:
    """``Linear -> ReLU -> Dropout -> Linear -> 1 logit`` on standardised inputs.

    Args:
        hidden: hidden units. dropout / l2: regularisation (l2 is Adam's weight decay).
        lr: Adam's step size. batch_size: samples per step.
        max_steps: step budget of one ``fit``; ``eval_every`` steps between validations;
            ``patience`` validations without improvement stop it.
        seed: initial weights and minibatch order.
    """

    def __init__(
        self,
        *,
        hidden: int = 64,
        dropout: float = 0.2,
        l2: float = 1e-4,
        lr: float = 2e-3,
        batch_size: int = 256,
        max_steps: int = 3000,
        eval_every: int = 50,
        patience: int = 6,
        seed: int = 0,
    ) -> None:
        self.config: dict[str, Any] = {
            "hidden": hidden,
            "dropout": dropout,
            "l2": l2,
            "lr": lr,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "eval_every": eval_every,
            "patience": patience,
            "seed": seed,
        }
        self.shift = np.zeros(0, dtype=np.float32)
        self.scale = np.ones(0, dtype=np.float32)
        self.module: nn.Module | None = None
        self.history: list[dict[str, float]] = []

    def _build(self, dim: int) -> nn.Module:
        c = self.config
        return nn.Sequential(
            nn.Linear(dim, c["hidden"]),
            nn.ReLU(),
            nn.Dropout(c["dropout"]),
            nn.Linear(c["hidden"], 1),
        )

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        validation: tuple[np.ndarray, np.ndarray],
        sample_weight: np.ndarray | None = None,
        distillation: Distillation | None = None,
        warm_start: bool = False,
        max_steps: int | None = None,
    ) -> Self:
        """Train on ``x``/``y`` (0/1), keeping the weights with the best validation log-loss.

        ``warm_start`` keeps the current weights and input scaling (an error if there are
        none); ``max_steps`` overrides the configured budget for this call (a short update).
        """
        c = self.config
        x = np.asarray(x, dtype=np.float32)
        if warm_start:
            if self.module is None:
                raise RuntimeError("warm start needs a fitted model")
        else:
            self.shift = x.mean(axis=0)
            self.scale = x.std(axis=0) + 1e-6
            torch.manual_seed(c["seed"])
            self.module = self._build(x.shape[1])
        assert self.module is not None
        generator = torch.Generator().manual_seed(c["seed"] + len(self.history))
        xs = torch.from_numpy(self._standardise(x))
        ys = torch.from_numpy(np.asarray(y, dtype=np.float32))
        ws = torch.from_numpy(
            np.ones(len(x), np.float32)
            if sample_weight is None
            else np.asarray(sample_weight, np.float32)
        )
        teacher = (
            None
            if distillation is None
            else torch.from_numpy(np.asarray(distillation.teacher_logit, np.float32))
        )
        x_val = np.asarray(validation[0], np.float32)
        y_val = np.asarray(validation[1], np.float32)
        optimiser = torch.optim.Adam(self.module.parameters(), lr=c["lr"], weight_decay=c["l2"])
        best = self._val_loss(x_val, y_val)
        best_state = copy.deepcopy(self.module.state_dict())
        self.history.append({"step": 0.0, "val_loss": best})
        stale, step, order, cursor = 0, 0, torch.randperm(len(xs), generator=generator), 0
        budget = c["max_steps"] if max_steps is None else max_steps
        self.module.train()
        while step < budget and stale < c["patience"]:
            if cursor >= len(order):
                order, cursor = torch.randperm(len(xs), generator=generator), 0
            rows = order[cursor : cursor + c["batch_size"]]
            cursor += c["batch_size"]
            optimiser.zero_grad()
            logit = self.module(xs[rows]).squeeze(1)
            loss = distillation_loss(
                logit,
                None if teacher is None else teacher[rows],
                ys[rows],
                ws[rows],
                strength=0.0 if distillation is None else distillation.strength,
                temperature=0.5 if distillation is None else distillation.temperature,
                adaptive=True if distillation is None else distillation.adaptive,
            )
            loss.backward()
            optimiser.step()
            step += 1
            if step % c["eval_every"] == 0 or step == budget:
                value = self._val_loss(x_val, y_val)
                self.module.train()
                self.history.append({"step": float(step), "val_loss": value})
                if value < best - 1e-5:
                    best, best_state, stale = value, copy.deepcopy(self.module.state_dict()), 0
                else:
                    stale += 1
        self.module.load_state_dict(best_state)
        self.module.eval()
        return self

    def logit(self, x: np.ndarray) -> np.ndarray:
        """``[n]`` logits of the positive class."""
        if self.module is None:
            raise RuntimeError("fit the model first")
        self.module.eval()
        with torch.no_grad():
            out = self.module(torch.from_numpy(self._standardise(np.asarray(x, np.float32))))
        return out.squeeze(1).numpy().astype(np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``[n]`` probabilities of the positive class."""
        return 1.0 / (1.0 + np.exp(-self.logit(x)))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(json-able config, named arrays)`` for saving without pickle."""
        if self.module is None:
            raise RuntimeError("fit the model before saving it")
        arrays = {f"module.{k}": v.detach().numpy() for k, v in self.module.state_dict().items()}
        arrays.update(shift=self.shift, scale=self.scale)
        return dict(self.config), arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        model = cls(**config)
        model.shift, model.scale = arrays["shift"], arrays["scale"]
        model.module = model._build(len(model.shift))
        model.module.load_state_dict(
            {
                k.removeprefix("module."): torch.from_numpy(np.array(v))
                for k, v in arrays.items()
                if k.startswith("module.")
            }
        )
        model.module.eval()
        return model

    def _val_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        logit = torch.from_numpy(self.logit(x))
        return float(F.binary_cross_entropy_with_logits(logit, torch.from_numpy(y).double()))

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)
