"""Candidates judged on text: held-out loss in nats per character beside nats per token.

``uspx eval`` compares two models token by token, which needs one vocabulary. A model with another
tokenizer splits the same completion into other tokens, so its loss per token measures something
else; the loss of the whole scored text does not depend on how it was cut. Here every model scores
the held-out items with its own tokenizer, and the loss is divided by the characters of the text it
scored.

Scored text. For an item with a completion: the completion (both models score exactly the same
characters, unless truncation to ``max_length`` tokens cut its end, in which case the characters up
to the end of the last kept token). For an item without one: the text after the model's first token
(nothing predicts a first token), so two tokenizers score the text from slightly different places;
each model's rate uses its own count. Characters are Python ``str`` characters (Unicode code points).

Per family and overall, with ``L`` the summed target cross-entropy (nats, :mod:`uspx.engine.losses`),
``N`` the target tokens and ``C`` the scored characters of each model:

- ``loss_per_char = L / C`` for teacher and candidate, ``delta_per_char`` their difference, with a
  95% interval from the per-item spread (items as the sampling unit, as ``uspx eval`` does per token);
- ``delta_per_teacher_token = delta_per_char * C_teacher / N_teacher``: the same gap in the units
  ``uspx eval`` reports. With one tokenizer and completion items it equals ``uspx eval``'s delta
  exactly (then ``C`` and ``L``'s text are the same for both models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from uspx.workload import EncodedItem, Workload, encode


@dataclass
class Scored:
    """An item as one model's tokenizer encodes it, with the scored text's characters."""

    item: EncodedItem
    chars: int  # characters of the scored text
    starts: list[int] | None = None  # character offset where each target token starts in the scored text


@dataclass
class TextLosses:
    """Per item (in the workload's order): summed target loss, target tokens, scored characters."""

    nll: np.ndarray
    tokens: np.ndarray
    chars: np.ndarray
    families: list[str] = field(default_factory=list)


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offset mapping
        return None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _starts(offsets: list[tuple[int, int]], first: int, begin: int) -> list[int]:
    """Where each token from ``first`` on starts, counted from ``begin``: the end of the token before
    it (0 for the text's first token). A token whose span equals the one before it continues a
    character split into byte tokens; it starts inside that character, at no character offset
    (a negative number, unique, which nothing aligns with)."""
    out = []
    for k in range(first, len(offsets)):
        if k and offsets[k] == offsets[k - 1]:
            out.append(-1 - k)
        else:
            out.append(offsets[k - 1][1] - begin if k else 0)
    return out


def _scored(item, e: EncodedItem, tokenizer) -> Scored:
    """Characters and target-token offsets of ``e`` (``item``'s encoding by ``tokenizer``)."""
    first = max(e.completion_start, 1)
    targets = e.input_ids[first:]
    text = item.completion if item.completion else item.prompt
    found = _offsets(tokenizer, text) if item.completion or item.messages is None else None
    if found is not None:
        ids, offsets = found
        # A token starts where the one before it ends: end offsets are never trimmed, where some
        # tokenizers' start offsets skip a token's leading space.
        if item.completion and ids[: len(targets)] == targets:
            starts = _starts(offsets[: len(targets)], 0, 0)
            # the whole completion, or (cut at max_length) up to the end of its last kept token
            end = 0 if not targets else len(text) if len(targets) == len(ids) else offsets[len(targets) - 1][1]
            return Scored(e, end, starts)
        if not item.completion and len(ids) >= len(e.input_ids) and ids[len(ids) - len(e.input_ids):] == e.input_ids:
            tail = offsets[len(ids) - len(e.input_ids):]  # the text's tail (truncation cuts its start)
            begin = tail[0][1] if tail else len(text)  # the end of the first token, which nothing predicts
            return Scored(e, len(text) - begin, _starts(tail, 1, begin))
    # no offsets (a slow tokenizer, a chat-rendered text): the decoded targets' characters
    return Scored(e, len(tokenizer.decode(targets, skip_special_tokens=True)), None)


def encode_scored(workload: Workload, tokenizer, max_length: int) -> list[Scored]:
    """``workload``'s items encoded as :func:`uspx.workload.encode` does (the token ids ``uspx eval``
    scores), each with its scored text's characters and target offsets."""
    return [_scored(item, e, tokenizer) for item, e in zip(workload.items, encode(workload, tokenizer, max_length))]


def text_losses(model, scored: Sequence[Scored], pad_id: int, batch_size: int = 8) -> TextLosses:
    """Each item's summed target cross-entropy under ``model`` (the engine's batches and losses)."""
    from uspx.engine.batches import make_batches, target_losses
    from uspx.engine.forward import logits

    items = [s.item for s in scored]
    nll = np.zeros(len(items))
    tokens = np.zeros(len(items), dtype=np.int64)
    for batch in make_batches(items, batch_size, pad_id):
        if not batch.loss_mask.any():
            continue
        losses = target_losses(batch, logits(model, batch)).double().numpy()
        owner = np.asarray(batch.rows)[torch.nonzero(batch.loss_mask)[:, 0].numpy()]
        np.add.at(nll, owner, losses)
        np.add.at(tokens, owner, 1)
    return TextLosses(nll, tokens, np.array([s.chars for s in scored], dtype=np.int64),
                      [s.item.family for s in scored])


def compare_text(teacher: TextLosses, candidate: TextLosses, same_tokenizer: bool) -> dict:
    """Per family and ``all``: the rates of both models and the deltas (see the module doc)."""
    if len(teacher.nll) != len(candidate.nll):
        raise ValueError("teacher and candidate scored different item lists")
    fam = np.array(teacher.families)
    out = {f: _summary(teacher, candidate, np.flatnonzero(fam == f), same_tokenizer) for f in sorted(set(fam))}
    out["all"] = _summary(teacher, candidate, np.arange(len(fam)), same_tokenizer)
    return out


def _summary(t: TextLosses, c: TextLosses, index: np.ndarray, same_tokenizer: bool) -> dict:
    index = index[(t.chars[index] > 0) & (c.chars[index] > 0)]
    nt, nc = t.tokens[index].sum(), c.tokens[index].sum()
    ct, cc = t.chars[index].sum(), c.chars[index].sum()
    row = dict(items=int(len(index)), teacher_tokens=int(nt), candidate_tokens=int(nc), teacher_chars=int(ct),
               candidate_chars=int(cc), same_tokenizer=same_tokenizer)
    if not len(index) or nt == 0 or nc == 0:
        return {**row, "delta_per_char": None, "delta_per_teacher_token": None}
    rate_t, rate_c = t.nll[index].sum() / ct, c.nll[index].sum() / cc
    delta = rate_c - rate_t
    # ratio estimator over items (as uspx eval's interval per token): residual of each item's gap
    resid = (c.nll[index] - rate_c * c.chars[index]) / cc - (t.nll[index] - rate_t * t.chars[index]) / ct
    m = len(index)
    se = math.sqrt((resid ** 2).sum() * m / (m - 1)) if m > 1 else float("nan")
    return {**row, "loss_teacher_per_token": float(t.nll[index].sum() / nt),
            "loss_candidate_per_token": float(c.nll[index].sum() / nc),
            "loss_teacher_per_char": float(rate_t), "loss_candidate_per_char": float(rate_c),
            "delta_per_char": float(delta),
            "delta_per_char_ci95": [float(delta - 1.96 * se), float(delta + 1.96 * se)] if math.isfinite(se) else None,
            "delta_per_teacher_token": float(delta * ct / nt),
            "chars_per_token": {"teacher": float(ct / nt), "candidate": float(cc / nc)}}
