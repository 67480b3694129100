"""Teacher vs candidate on the same tokens: loss, top-1 agreement and KL, per item, in one pass.

Targets, batching and the loss are those of :mod:`uspx.engine.losses` (one definition for every
stage); teacher and candidate logits at every target position come from the engine's paired run
on the same batch, so agreement and KL compare like with like, whole or layer by layer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from uspx.engine.batches import Batch, make_batches
from uspx.engine.losses import kl_of, log_probs, next_tokens, nll_of
from uspx.engine.pair import PairObserver, run_pair
from uspx.engine.source import WeightSource
from uspx.workload import EncodedItem


@dataclass
class Runner:
    """A model to time, and what to wrap each forward in (a restriction for a mask-only candidate)."""

    model: torch.nn.Module
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class ItemStats:
    """Per item sums over its target tokens (float64 / int64 arrays in the items' order)."""

    nll_teacher: np.ndarray
    nll_candidate: np.ndarray
    agree: np.ndarray
    kl: np.ndarray
    tokens: np.ndarray


class _Compare(PairObserver):
    """Loss of both models, top-1 agreement and KL(teacher || candidate) at each target position,
    summed per item."""

    def __init__(self, n_items: int):
        self.stats = ItemStats(*(np.zeros(n_items) for _ in range(4)), np.zeros(n_items, dtype=np.int64))

    def pair_logits(self, batch: Batch, teacher: torch.Tensor, candidate: torch.Tensor, start: int = 0) -> None:
        mask = batch.loss_mask
        n = len(teacher)
        targets = next_tokens(batch.input_ids, mask)[start : start + n]
        # log-probabilities once per side: loss, agreement and KL all read them
        lt, lc = log_probs(teacher), log_probs(candidate)
        per_token = {
            "nll_teacher": nll_of(lt, targets),
            "nll_candidate": nll_of(lc, targets),
            "agree": (lt.argmax(-1) == lc.argmax(-1)).float(),
            "kl": kl_of(lt, lc),  # KL(teacher || candidate), nats
        }
        owner = torch.nonzero(mask)[start : start + n, 0]  # target -> batch row
        rows = np.asarray(batch.rows)[owner.numpy()]
        for key, values in per_token.items():
            np.add.at(getattr(self.stats, key), rows, values.double().numpy())
        np.add.at(self.stats.tokens, rows, 1)


def compare(teacher: WeightSource, candidate: WeightSource, items: Sequence[EncodedItem], batch_size: int,
            pad_id: int = 0, progress: bool = False,
            candidate_context: Callable[[], ContextManager] = contextlib.nullcontext,
            teacher_context: Callable[[], ContextManager] = contextlib.nullcontext) -> ItemStats:
    """Both models on the same batches (:func:`uspx.engine.pair.run_pair`): whole models batch by
    batch, or a decoder layer at a time when either is read from its files; the numbers agree."""
    streamed = not (teacher.resident and candidate.resident)
    # a layer at a time holds every token's hidden state: batches of bounded padded size
    batches = make_batches(items, batch_size, pad_id, max_tokens=2048 if streamed else None)
    observer = _Compare(len(items))
    run_pair(teacher, candidate, batches, [observer], candidate_context=candidate_context,
             teacher_context=teacher_context, progress=progress, label="evaluating")
    return observer.stats


def summarise(stats: ItemStats, index: np.ndarray) -> dict:
    """Token-weighted means over the items in ``index``, with a 95% interval for the loss delta.

    The delta is a ratio of sums (candidate - teacher loss over tokens); its standard error comes
    from the per-item spread (ratio estimator, items as the sampling unit, since tokens of one item
    are not independent).
    """
    tok = stats.tokens[index].astype(np.float64)
    total = tok.sum()
    out: dict = {"items": int(len(index)), "tokens": int(total)}
    if total == 0:
        return {**out, "loss_teacher": None, "loss_candidate": None, "delta": None, "delta_ci95": None,
                "perplexity_ratio": None, "top1_agreement": None, "kl": None}
    lt, lc = stats.nll_teacher[index].sum() / total, stats.nll_candidate[index].sum() / total
    delta = lc - lt
    d_item = stats.nll_candidate[index] - stats.nll_teacher[index]
    m = len(index)
    se = math.sqrt(((d_item - delta * tok) ** 2).sum() * m / max(m - 1, 1)) / total if m > 1 else float("nan")
    return {
        **out,
        "loss_teacher": float(lt),
        "loss_candidate": float(lc),
        "delta": float(delta),
        "delta_ci95": [float(delta - 1.96 * se), float(delta + 1.96 * se)] if math.isfinite(se) else None,
        "perplexity_ratio": float(math.exp(delta)),
        "top1_agreement": float(stats.agree[index].sum() / total),
        "kl": float(stats.kl[index].sum() / total) if np.isfinite(stats.kl[index]).all() else None,
    }
