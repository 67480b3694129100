"""The losses every stage measures or trains on, defined once: next-token cross-entropy at target
tokens, KL between a teacher's and a candidate's next-token distributions, and the token masks that
pick the targets.

Targets. For an encoded item with tokens ``x_0..x_{n-1}`` and ``completion_start = s``, the target
tokens are ``x_j`` for ``max(s, 1) <= j <= n - 1``, each predicted by the logits at position
``j - 1``. A mask over positions ([B, T] bool) is True at those *predicting* positions; its last
column is always False (nothing follows the last token), so the targets of its True positions, in
row-major order, are the ids one column to the right (:func:`next_tokens`).

Cross-entropy: ``-log softmax(logits)[target]`` in nats, computed in float32 whatever the logits'
dtype (bf16 log-probabilities lose the small loss differences the stages compare).

KL: ``KL(p_teacher || p_candidate) = sum_v p_T(v) (log p_T(v) - log p_C(v))`` per token, in nats,
the teacher's distribution first (the candidate is charged where the teacher puts mass). With a
temperature ``tau`` both distributions are ``softmax(logits / tau)``; :func:`token_kl` returns the
plain KL at that temperature and :func:`kd_loss` multiplies its mean by ``tau^2`` (the distillation
loss of Hinton et al., which keeps gradient sizes comparable across temperatures).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from uspx.workload import EncodedItem

__all__ = ["kd_loss", "kl_of", "layer_loss", "log_probs", "masked_token_nll", "next_tokens", "nll_of",
           "real_pair_mask", "target_mask", "token_kl", "token_nll"]


# ----- token masks ----------------------------------------------------------------------------------
def target_mask(items: Sequence[EncodedItem], width: int) -> torch.Tensor:
    """[B, width] bool: True at predicting positions ``p`` with ``max(s, 1) <= p + 1 <= n - 1``."""
    mask = torch.zeros((len(items), width), dtype=torch.bool)
    for r, e in enumerate(items):
        first = max(e.completion_start, 1) - 1
        last = len(e.input_ids) - 2
        if last >= first:
            mask[r, first : last + 1] = True
    return mask


def real_pair_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at positions ``p`` where ``p`` and ``p + 1`` are both real tokens (every
    next-token prediction inside a padded row; the last column is False)."""
    real = attention_mask.bool()
    out = torch.zeros_like(real)
    out[:, :-1] = real[:, :-1] & real[:, 1:]
    return out


def next_tokens(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] the target ids of ``mask``'s True positions, in row-major order (``mask[:, -1]`` must be
    False: nothing follows the last column)."""
    return input_ids[:, 1:][mask[:, :-1]]


# ----- cross-entropy --------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy (float32, nats) of ``logits`` [..., V] at ``targets`` [...]: per token (the
    targets' shape) with ``reduction="none"``, else their ``"sum"`` or ``"mean"``."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be none, sum or mean, not {reduction!r}")
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    return flat.reshape(targets.shape) if reduction == "none" else flat


def masked_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 next-token cross-entropy at ``mask``'s predicting positions, 0 elsewhere, from
    logits at every position [B, T, V]; only the masked positions are computed."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    if mask.any():
        out[mask] = token_nll(logits[mask], next_tokens(input_ids, mask))
    return out


def log_probs(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """float32 ``log softmax(logits / tau)`` over the last dimension."""
    logits = logits.float()
    return F.log_softmax(logits / tau if tau != 1.0 else logits, dim=-1)


def nll_of(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from log-probabilities [..., V] at ``targets`` [...] (for callers that already
    hold them, e.g. to take a KL from the same distributions)."""
    return -logp.gather(-1, targets[..., None])[..., 0]


# ----- KL -------------------------------------------------------------------------------------------
def kl_of(logp_teacher: torch.Tensor, logp_candidate: torch.Tensor) -> torch.Tensor:
    """Per token ``KL(p_teacher || p_candidate)`` (nats) from log-probabilities [..., V]."""
    return (logp_teacher.exp() * (logp_teacher - logp_candidate)).sum(-1)


def token_kl(teacher: torch.Tensor, candidate: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """[...] per token ``KL(softmax(teacher / tau) || softmax(candidate / tau))`` from logits [..., V]
    (float32, nats, no ``tau^2`` factor)."""
    return kl_of(log_probs(teacher, tau), log_probs(candidate, tau))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Token-level distillation: ``tau^2 * mean KL(softmax(teacher / tau) || softmax(student / tau))``
    over the rows of [n, V] logits; 0 (still attached to ``student``'s graph) when there are none."""
    if student.numel() == 0:
        return student.sum() * 0.0
    return tau * tau * token_kl(teacher, student, tau).mean()


def layer_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a block's outputs, relative to the original's mean square (scale-free)."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)
