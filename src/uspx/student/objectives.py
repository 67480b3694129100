"""What a dense student of another model family minimises.

Same tokenizer: token-level KD exactly as recovery defines it (:func:`uspx.recover.objectives.kd_loss`,
``tau^2 * mean KL(p_T || p_S)`` over the target tokens), plus cross-entropy on the completions.

Different tokenizer: the teacher's next-token distribution lives on another vocabulary, so a KL
between the two is undefined. Two objectives replace it:

- sequence-level KD: the student learns, by cross-entropy, the text the teacher writes for the
  user's calibration prompts (the continuations of :func:`uspx.recover.train.generated_items`,
  re-tokenised with the student's tokenizer);
- universal logit distillation (ULD): at every position where both tokenizations have a token
  boundary at the same character of the scored text (:func:`aligned_targets`), both models predict
  "the text that starts here"; the loss compares the two distributions sorted by probability,
  ``sum_i |p_T^(i) - p_S^(i)|`` with ``p^(i)`` the i-th largest probability and the shorter
  vocabulary padded with zeros (:func:`uld_loss`). Sorting makes it independent of which id means
  which token, so it needs no vocabulary map.

What ULD is when the tokenizers are the same. Every boundary is shared, so the aligned positions are
all the target tokens, and at each one ``ULD(p, q) = min over permutations s of ||p - q o s||_1``
(matching sorted values minimises an L1 matching), hence

    ULD(p, q) <= ||p - q||_1 = 2 TV(p, q) <= sqrt(2 KL(p || q))   (Pinsker),

with ``ULD = ||p - q||_1`` exactly when the student ranks the tokens in the teacher's order, and
``ULD = 0`` exactly when ``q`` is a permutation of ``p`` (so at ``q = p``). It is a lower bound of
the total-variation distance that token KD's KL bounds from above: it pulls the shape of the
student's distribution (how peaked it is) to the teacher's, not which token is likely; the
cross-entropy on the teacher's own text supplies the "which".
"""

from __future__ import annotations

from typing import Sequence

import torch

from uspx.engine.losses import log_probs
from uspx.recover.objectives import kd_loss

__all__ = ["aligned_targets", "kd_loss", "uld_loss", "uld_per_token"]


def uld_per_token(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """[n] ``sum_i |sort(p_T)_i - sort(p_S)_i|`` per row of logits student [n, V_S], teacher [n, V_T]
    (``p = softmax(logits / tau)``, sorted in decreasing order, the shorter padded with zeros)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student.shape[0]} student rows against {teacher.shape[0]} teacher rows")
    ps = log_probs(student, tau).exp().sort(dim=-1, descending=True).values
    pt = log_probs(teacher, tau).exp().sort(dim=-1, descending=True).values
    width = max(ps.shape[-1], pt.shape[-1])
    ps = torch.nn.functional.pad(ps, (0, width - ps.shape[-1]))
    pt = torch.nn.functional.pad(pt, (0, width - pt.shape[-1]))
    return (pt.to(ps.device) - ps).abs().sum(-1)


def uld_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Mean ULD over the aligned rows; 0 (still attached to ``student``'s graph) when there are none."""
    if student.numel() == 0:
        return student.sum() * 0.0
    return uld_per_token(student, teacher, tau).mean()


def aligned_targets(student_starts: Sequence[int], teacher_starts: Sequence[int]) -> list[tuple[int, int]]:
    """(student target k, teacher target j) for every target token of each model that starts at the
    same character of the scored text: both models then predict the same text from the same place.
    ``*_starts[k]``: the character offset at which the model's k-th target token starts. Where
    several tokens start at one character (the bytes of one character split into byte tokens) only
    the first starts there; the others begin inside the character."""
    where: dict[int, int] = {}
    for j, c in enumerate(teacher_starts):
        where.setdefault(c, j)
    out, seen = [], set()
    for k, c in enumerate(student_starts):
        if c in where and c not in seen:
            out.append((k, where[c]))
        seen.add(c)
    return out
