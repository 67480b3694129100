"""Teacher vs candidate on the same tokens: loss, top-1 agreement and KL, per item, in one pass.

Targets, batching and the loss are those of :mod:`uspx.engine.losses` (one definition for every
stage); teacher and candidate logits at every target position are taken from the same
batch, so agreement and KL compare like with like.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from uspx.engine.losses import kl_of, log_probs, next_tokens, nll_of
from uspx.progress import progress_bar
from uspx.score.loss import Batch, make_batches
from uspx.workload import EncodedItem


@dataclass
class Runner:
    """A model to run, and what to wrap each forward in (a restriction for a mask-only candidate)."""

    model: torch.nn.Module
    context: Callable[[], ContextManager] = contextlib.nullcontext

    @torch.no_grad()
    def target_logits(self, batch: Batch) -> torch.Tensor:
        """[N_targets, V] float32 logits at the batch's predicting positions, row-major order."""
        mask = batch.loss_mask
        with self.context():
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=mask, use_cache=False
            ).logits
        if logits.dim() == 3:  # a model that ignored logits_to_keep returns every position
            logits = logits[mask]
        return logits.float()


@dataclass
class ItemStats:
    """Per item sums over its target tokens (float64 / int64 arrays in the items' order)."""

    nll_teacher: np.ndarray
    nll_candidate: np.ndarray
    agree: np.ndarray
    kl: np.ndarray
    tokens: np.ndarray


def compare(teacher: Runner, candidate: Runner, items: Sequence[EncodedItem], batch_size: int,
            pad_id: int = 0, progress: bool = False) -> ItemStats:
    n = len(items)
    stats = ItemStats(*(np.zeros(n) for _ in range(4)), np.zeros(n, dtype=np.int64))
    batches = make_batches(items, batch_size, pad_id)
    with progress_bar("evaluating", total=len(batches), unit="batches", enabled=progress) as bar:
        for batch in batches:
            mask = batch.loss_mask
            if mask.any():
                targets = next_tokens(batch.input_ids, mask)
                # log-probabilities once per side: loss, agreement and KL all read them
                lt, lc = log_probs(teacher.target_logits(batch)), log_probs(candidate.target_logits(batch))
                per_token = {
                    "nll_teacher": nll_of(lt, targets),
                    "nll_candidate": nll_of(lc, targets),
                    "agree": (lt.argmax(-1) == lc.argmax(-1)).float(),
                    "kl": kl_of(lt, lc),  # KL(teacher || candidate), nats
                }
                row_of = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]  # target -> batch row
                for key, values in per_token.items():
                    sums = torch.zeros(mask.shape[0], dtype=torch.float64).index_add_(0, row_of, values.double())
                    getattr(stats, key)[batch.rows] = sums.numpy()
                stats.tokens[batch.rows] = mask.sum(1).numpy()
            bar.advance()
    return stats


def compare_layerwise(teacher, candidate, items: Sequence[EncodedItem], pad_id: int = 0,
                      progress: bool = False, candidate_kept: dict | None = None) -> ItemStats:
    """``compare`` for models run a layer at a time (engine weight sources): each model runs once over
    the items; losses and top-1 agreement as ``compare`` gives them. KL would need both models' full
    distributions at once, which a layer-at-a-time run does not hold: it is left out (NaN)."""
    from uspx.engine import run
    from uspx.engine.observers import TokenLoss

    n = len(items)
    batches = make_batches(items, 8, pad_id, max_tokens=2048)
    t, c = TokenLoss(n, argmax=True), TokenLoss(n, argmax=True)
    run(teacher, batches, [t], progress=progress, label="teacher loss")
    with (candidate.adapter.restrict(candidate_kept) if candidate_kept else contextlib.nullcontext()):
        run(candidate, batches, [c], progress=progress, label="candidate loss")
    agree = np.array([0.0 if a is None else float((a == b).sum()) for a, b in zip(t.argmax, c.argmax)])
    return ItemStats(t.sum_loss, c.sum_loss, agree, np.full(n, np.nan), t.n_tokens)


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
