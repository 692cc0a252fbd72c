"""Adaptive knowledge distillation from the entire-space teacher (needs the ``torch`` extra).

For a labelled sample ``i`` with label ``y_i``, student logit ``s_i`` and teacher logit ``t_i``,
the student's loss is

    L_i = BCE(y_i, sigmoid(s_i)) + alpha_i * KL(Bern(sigmoid(t_i)) || Bern(sigmoid(s_i)))

    alpha_i = lambda * sigmoid((BCE(y_i, sigmoid(s_i)) - BCE(y_i, sigmoid(t_i))) / tau)

computed without gradient through ``alpha_i``. The weight grows towards ``lambda`` where the
teacher fits the label better than the student does (its knowledge helps here), falls towards 0
where the teacher is worse (forcing it on the student would be negative transfer), and is
``lambda / 2`` where both fit equally; ``tau`` sets how sharply it switches. With
``adaptive=False`` every sample gets ``alpha_i = lambda`` (plain distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def distillation_weight(
    student_logit: torch.Tensor,
    teacher_logit: torch.Tensor,
    label: torch.Tensor,
    *,
    strength: float,
    temperature: float = 0.5,
    adaptive: bool = True,
) -> torch.Tensor:
    """``alpha_i`` of the module docstring (``strength`` is lambda, ``temperature`` is tau)."""
    if not adaptive:
        return torch.full_like(student_logit, float(strength))
    with torch.no_grad():
        gap = F.binary_cross_entropy_with_logits(
            student_logit, label, reduction="none"
        ) - F.binary_cross_entropy_with_logits(teacher_logit, label, reduction="none")
        return strength * torch.sigmoid(gap / temperature)


def bernoulli_kl(teacher_logit: torch.Tensor, student_logit: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(sigmoid(t)) || Bern(sigmoid(s)))`` per sample; zero when the logits agree."""
    p = torch.sigmoid(teacher_logit)
    return F.binary_cross_entropy_with_logits(
        student_logit, p, reduction="none"
    ) - F.binary_cross_entropy_with_logits(teacher_logit, p, reduction="none")


def distillation_loss(
    student_logit: torch.Tensor,
    teacher_logit: torch.Tensor | None,
    label: torch.Tensor,
    sample_weight: torch.Tensor,
    *,
    strength: float,
    temperature: float = 0.5,
    adaptive: bool = True,
) -> torch.Tensor:
    """``sum_i w_i L_i / sum_i w_i``; with no teacher or ``strength == 0``, weighted BCE."""
    loss = F.binary_cross_entropy_with_logits(student_logit, label, reduction="none")
    if teacher_logit is not None and strength > 0:
        alpha = distillation_weight(
            student_logit,
            teacher_logit,
            label,
            strength=strength,
            temperature=temperature,
            adaptive=adaptive,
        )
        loss = loss + alpha * bernoulli_kl(teacher_logit, student_logit)
    return (sample_weight * loss).sum() / sample_weight.sum().clamp_min(1e-12)
