"""The loss every causal score and the evaluation stage measure: next-token cross-entropy on the
tokens the user cares about.

Definition (one place, so score and evaluate agree): for an encoded item with tokens ``x_0..x_{n-1}``
and ``completion_start = s``, the *target* tokens are ``x_j`` for ``max(s, 1) <= j <= n - 1``; each
is predicted by the logits at position ``j - 1``. So an item with a completion is scored on its
completion tokens only (the prompt is context), and an item without one (``s = 0``) on every token
but the first (nothing predicts it). An item's loss is the sum of ``-log p(x_j | x_<j)`` over its
targets; a set's loss is the sum over items divided by the total number of targets (token-weighted,
so it equals the mean per-token loss of the whole set).

The per-token loss is stored at the *predicting* position ``p = j - 1``, the position whose hidden
state the routers saw: scores that ask "loss on tokens routed to expert e" use that alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uspx.progress import progress_bar
from uspx.workload import EncodedItem


@dataclass
class Batch:
    """Right-padded items: ``rows[i]`` is the position of ``items[i]`` in the caller's list."""

    rows: list[int]
    items: list[EncodedItem]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] bool: position p predicts a target token p + 1

    @property
    def real(self) -> torch.Tensor:
        """[B*T] bool: real (non-pad) tokens, in the flattened order the MoE layers see."""
        return self.attention_mask.reshape(-1).bool()


def loss_mask(items: Sequence[EncodedItem], width: int) -> torch.Tensor:
    """[B, width] bool: True at predicting positions ``p`` with ``max(s, 1) <= p + 1 <= n - 1``."""
    mask = torch.zeros((len(items), width), dtype=torch.bool)
    for r, e in enumerate(items):
        first = max(e.completion_start, 1) - 1
        last = len(e.input_ids) - 2
        if last >= first:
            mask[r, first : last + 1] = True
    return mask


def n_targets(item: EncodedItem) -> int:
    return max(0, len(item.input_ids) - max(item.completion_start, 1))


def make_batches(items: Sequence[EncodedItem], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Batches of similar length (sorted, longest first) to waste little compute on padding.

    Right padding with a causal model leaves every real token's logits unchanged, so batching does
    not change any loss; sorting only changes which items share a forward.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    out = []
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        group = [items[i] for i in rows]
        width = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(group), width), dtype=torch.long)
        for r, e in enumerate(group):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
            att[r, : len(e.input_ids)] = 1
        out.append(Batch(rows, group, ids, att, loss_mask(group, width)))
    return out


def token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[B, T] float32 next-token cross-entropy at every predicting position (0 where not a target).

    Only the target positions go through the LM head (``logits_to_keep`` with a boolean mask, which
    every transformers MoE family supports): the head over a large vocabulary is a big share of a
    small model's forward, and a prompt's positions are never scored.
    """
    mask = batch.loss_mask
    out = torch.zeros(mask.shape, dtype=torch.float32)
    if not mask.any():
        return out
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=mask, use_cache=False
    ).logits
    if logits.dim() == 3:  # a model that ignored logits_to_keep returns every position
        logits = logits[mask]
    # the mask's last column is always False (nothing follows the last token), so the targets of
    # the True positions, in the same row-major order, are the ids one column to the right
    targets = batch.input_ids[:, 1:][mask[:, :-1]]
    out[mask] = F.cross_entropy(logits.float(), targets, reduction="none")
    return out


@dataclass
class ItemLosses:
    """Per item: summed target loss and number of target tokens (the order of the items given)."""

    sum_loss: np.ndarray  # float64 [n]
    n_tokens: np.ndarray  # int64 [n]

    def mean(self) -> float:
        """Token-weighted mean loss of the whole set (nan when it has no target tokens)."""
        total = int(self.n_tokens.sum())
        return float(self.sum_loss.sum() / total) if total else float("nan")

    def __len__(self) -> int:
        return len(self.sum_loss)

    def __iter__(self) -> Iterator[tuple[float, int]]:
        return iter(zip(self.sum_loss.tolist(), self.n_tokens.tolist()))


def compute_loss(
    model: torch.nn.Module,
    encoded_items: Sequence[EncodedItem],
    batch_size: int = 8,
    *,
    pad_id: int = 0,
    progress: bool = False,
) -> ItemLosses:
    """Per-item (sum of next-token loss, number of target tokens) under the module's definition.

    Public helper: the evaluation stage compares teacher and candidate with it, so both stages measure
    the same thing.
    """
    n = len(encoded_items)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([n_targets(e) for e in encoded_items], dtype=np.int64)
    batches = make_batches(encoded_items, batch_size, pad_id)
    with torch.no_grad(), progress_bar("loss", total=len(batches), unit="batches", enabled=progress) as bar:
        for batch in batches:
            per_token = token_losses(model, batch)
            sums[batch.rows] = per_token.double().sum(dim=1).numpy()
            bar.advance()
    return ItemLosses(sums, counts)
