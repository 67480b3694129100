"""The loss every causal score and the evaluation stage measure: next-token cross-entropy on the
tokens the user cares about, as :mod:`uspx.engine.losses` computes it.

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

from uspx.engine.batches import Batch, loss_mask, make_batches, n_targets, target_losses
from uspx.engine.forward import logits
from uspx.workload import EncodedItem

__all__ = ["Batch", "ItemLosses", "compute_loss", "loss_mask", "make_batches", "n_targets", "token_losses"]


def token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[B, T] float32 next-token cross-entropy at every predicting position (0 where not a target),
    on the CPU; differentiable when called with gradients enabled.

    Only the target positions go through the LM head (:func:`uspx.engine.forward.logits`).
    """
    mask = batch.loss_mask
    out = torch.zeros(mask.shape, dtype=torch.float32)
    if not mask.any():
        return out
    out[mask] = target_losses(batch, logits(model, batch, grad=torch.is_grad_enabled()))
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
    model,
    encoded_items: Sequence[EncodedItem],
    batch_size: int = 8,
    *,
    pad_id: int = 0,
    progress: bool = False,
) -> ItemLosses:
    """Per-item (sum of next-token loss, number of target tokens) under the module's definition.

    ``model`` is a loaded model or an engine weight source (a checkpoint read layer by layer). The
    evaluation stage compares teacher and candidate with it, so both stages measure the same thing.
    """
    from uspx.engine import InMemory, WeightSource, run
    from uspx.engine.observers import TokenLoss

    source = model if isinstance(model, WeightSource) else InMemory(model)
    counts = np.array([n_targets(e) for e in encoded_items], dtype=np.int64)
    observer = TokenLoss(len(encoded_items))
    run(source, make_batches(encoded_items, batch_size, pad_id), [observer], progress=progress, label="loss")
    return ItemLosses(observer.sum_loss, counts)
