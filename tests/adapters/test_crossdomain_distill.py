"""The adaptive distillation weight behaves as its docstring says."""

from __future__ import annotations

import pytest
import torch
from downstream_adapters.crossdomain.distill import (
    bernoulli_kl,
    distillation_loss,
    distillation_weight,
)

LABEL = torch.tensor([1.0, 1.0, 1.0, 0.0])
GOOD, BAD = 4.0, -4.0  # logits that fit / miss a positive label


def test_weight_trusts_the_teacher_only_where_it_fits_the_label_better() -> None:
    student = torch.tensor([BAD, GOOD, 0.0, 0.0])
    teacher = torch.tensor([GOOD, BAD, 0.0, 0.0])
    alpha = distillation_weight(student, teacher, LABEL, strength=2.0, temperature=0.5)
    assert alpha[0] == pytest.approx(2.0, abs=1e-3)  # teacher right, student wrong: ~lambda
    assert alpha[1] == pytest.approx(0.0, abs=1e-3)  # teacher wrong, student right: ~0
    assert alpha[2] == pytest.approx(1.0) and alpha[3] == pytest.approx(1.0)  # tie: lambda / 2
    assert ((alpha >= 0) & (alpha <= 2.0)).all()


def test_temperature_sets_how_sharply_the_weight_switches() -> None:
    student, teacher, label = torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([1.0])
    sharp = distillation_weight(student, teacher, label, strength=1.0, temperature=0.05)
    soft = distillation_weight(student, teacher, label, strength=1.0, temperature=5.0)
    assert sharp.item() > 0.95 and 0.5 < soft.item() < 0.55


def test_fixed_mode_gives_every_sample_the_strength() -> None:
    student = torch.tensor([BAD, GOOD, 0.0, 0.0])
    alpha = distillation_weight(student, -student, LABEL, strength=0.7, adaptive=False)
    assert torch.allclose(alpha, torch.full((4,), 0.7))


def test_kl_is_zero_when_student_and_teacher_agree_and_positive_otherwise() -> None:
    logits = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(bernoulli_kl(logits, logits), torch.zeros(3), atol=1e-6)
    assert (bernoulli_kl(logits, logits + 1) > 0).all()


def test_loss_pulls_the_student_to_the_teacher_only_where_the_weight_allows() -> None:
    # sample 0: the teacher fits the label, so distillation adds a pull towards it;
    # sample 1: the teacher is wrong, so its pull is (almost) switched off.
    label = torch.tensor([1.0, 1.0])
    teacher = torch.tensor([GOOD, BAD])
    weights = torch.ones(2)
    grads = []
    for strength in (0.0, 1.0):
        student = torch.tensor([0.0, 2.0], requires_grad=True)
        distillation_loss(student, teacher, label, weights, strength=strength).backward()
        assert student.grad is not None
        grads.append(student.grad.clone())
    plain, distilled = grads
    assert distilled[0] < plain[0] - 0.1  # a stronger push up, towards the confident teacher
    assert distilled[1] == pytest.approx(plain[1].item(), abs=0.02)


def test_without_a_teacher_the_loss_is_weighted_cross_entropy() -> None:
    student = torch.tensor([0.0, 0.0])
    label = torch.tensor([1.0, 0.0])
    loss = distillation_loss(student, None, label, torch.tensor([1.0, 3.0]), strength=1.0)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
