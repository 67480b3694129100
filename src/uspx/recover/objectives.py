"""What recovery minimises: the one definition of each distillation loss.

Token-level KD: ``tau^2 * KL(p_T || p_S)`` with ``p = softmax(logits / tau)``, averaged over the
target tokens (completion tokens when the item has a completion, else every predicted token; the
targets of ``engine.losses.target_mask``): :func:`uspx.engine.losses.kd_loss`, re-exported here. The
``tau^2`` keeps gradient sizes comparable across temperatures.

Router KD: per MoE layer and token, the pruned router's distribution over its experts (softmax of its
logits) against the original router's distribution renormalised over the kept experts (softmax of
the original logits of the kept experts, in the pruned model's order), ``KL(original || pruned)``.

Layer matching: each MoE block's output of the pruned model against the original's on the same
inputs' positions, mean squared error divided by the original's mean square (scale-free):
:func:`uspx.engine.losses.layer_loss`, re-exported here.

The hard-concrete gates behind learned expert masks live with the masks (``uspx.score.masks``).
"""

from __future__ import annotations

import torch

from uspx.engine.losses import kd_loss, layer_loss, token_kl

__all__ = ["kd_loss", "layer_loss", "router_kd_loss"]


def router_kd_loss(student: torch.Tensor, teacher: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher[:, kept]) || softmax(student))``, mean over tokens; student [N, n_kept],
    teacher [N, E], ``kept`` the original ids of the student's experts in its order."""
    return token_kl(teacher.float()[:, kept], student).mean()
