"""What recovery minimises: the one definition of each distillation loss, and the hard-concrete gates
behind learned expert masks.

Token-level KD: ``tau^2 * KL(p_T || p_S)`` with ``p = softmax(logits / tau)``, averaged over the
target tokens (completion tokens when the item has a completion, else every predicted token; the
targets of ``engine.losses.target_mask``): :func:`uspx.engine.losses.kd_loss`, re-exported here. The
``tau^2`` keeps gradient sizes comparable across temperatures.

Router KD: per MoE layer and token, the pruned router's distribution over its experts (softmax of its
logits) against the original router's distribution renormalised over the kept experts (softmax of
the original logits of the kept experts, in the pruned model's order), ``KL(original || pruned)``.

Layer matching: each MoE block's output of the pruned model against the original's on the same
inputs' positions, mean squared error divided by the original's mean square (scale-free).

Hard-concrete gates (Louizos et al., 2018): ``u ~ U(0, 1)``,
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretched to ``(gamma, zeta)`` and clamped
to [0, 1]; ``P(gate != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``. The Lagrangian term
``lambda_1 * (E[n] - n_target) + lambda_2 * (E[n] - n_target)^2`` drives the expected number of open
gates to the target; the lambdas are maximised (gradient ascent) while the gates minimise.
"""

from __future__ import annotations

import math

import torch

from uspx.engine.losses import kd_loss, token_kl

__all__ = ["BETA", "GAMMA", "ZETA", "deterministic_gates", "gate_open_probability", "hard_concrete", "kd_loss",
           "lagrangian", "layer_loss", "router_kd_loss"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # the hard-concrete constants of Louizos et al.


def router_kd_loss(student: torch.Tensor, teacher: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher[:, kept]) || softmax(student))``, mean over tokens; student [N, n_kept],
    teacher [N, E], ``kept`` the original ids of the student's experts in its order."""
    return token_kl(teacher.float()[:, kept], student).mean()


def layer_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a block's outputs, relative to the original's mean square."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample of the gates (differentiable in ``log_alpha``)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def gate_open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(gate != 0)``: the expected number of open gates is its sum."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates at test time: the stretched sigmoid of ``log_alpha`` without noise, clamped."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def lagrangian(expected: torch.Tensor, target: float, lambda_1: torch.Tensor, lambda_2: torch.Tensor) -> torch.Tensor:
    """``lambda_1 * (E[n] - target) + lambda_2 * (E[n] - target)^2``: minimised in the gates,
    maximised in the lambdas (their gradients are ascended)."""
    gap = expected - target
    return lambda_1 * gap + lambda_2 * gap * gap
