"""The one batcher: right-padded batches of encoded items, with the rows every observer files under.

Right padding with a causal model leaves every real token's computation unchanged, so batching
never changes a result; only which items share a forward. Tokens are numbered by their position in
the concatenation of the items in the caller's order ("token rows"), whatever the batch order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from uspx.engine.losses import next_tokens, token_nll
from uspx.engine.losses import target_mask as loss_mask
from uspx.workload import EncodedItem


@dataclass
class Batch:
    """Right-padded items: ``rows[i]`` is the position of ``items[i]`` in the caller's list."""

    rows: list[int]
    items: list[EncodedItem]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] bool: position p predicts a target token p + 1
    token_rows: np.ndarray  # [B * T] int64: token row of each position, -1 for padding
    slot: int = 0  # first row of this batch in a hidden-state store (B * T rows, padding included)

    @property
    def real(self) -> torch.Tensor:
        """[B*T] bool: real (non-pad) tokens, in the flattened order the MoE layers see."""
        return self.attention_mask.reshape(-1).bool()

    @property
    def size(self) -> int:
        return int(self.input_ids.numel())

    @property
    def slots(self) -> np.ndarray:
        """Its rows in a hidden-state store: ``slot .. slot + size`` (padding included)."""
        return np.arange(self.slot, self.slot + self.size)


def n_targets(item: EncodedItem) -> int:
    return max(0, len(item.input_ids) - max(item.completion_start, 1))


def token_offsets(items: Sequence[EncodedItem]) -> np.ndarray:
    """[n + 1]: item i's tokens are rows ``offsets[i]:offsets[i + 1]``."""
    return np.concatenate([[0], np.cumsum([len(e.input_ids) for e in items])]).astype(np.int64)


def make_batches(items: Sequence[EncodedItem], batch_size: int, pad_id: int = 0, *,
                 by_length: bool = True, max_tokens: int | None = None) -> list[Batch]:
    """Batches of at most ``batch_size`` items (and, with ``max_tokens``, at most that many padded
    positions, one item at least); ``by_length`` groups similar lengths (longest first) to waste
    little compute on padding, else batches follow the items' order."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    offsets = token_offsets(items)
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i)) if by_length else list(range(len(items)))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            last = groups[-1]
            width = max(len(items[j].input_ids) for j in last + [i])
            if len(last) < batch_size and (max_tokens is None or (len(last) + 1) * width <= max_tokens):
                last.append(i)
                continue
        groups.append([i])
    out, slot = [], 0
    for rows in groups:
        group = [items[i] for i in rows]
        width = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(group), width), dtype=torch.long)
        token_rows = np.full((len(group), width), -1, dtype=np.int64)
        for r, (i, e) in enumerate(zip(rows, group)):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            att[r, :n] = 1
            token_rows[r, :n] = np.arange(offsets[i], offsets[i + 1])
        out.append(Batch(rows, group, ids, att, loss_mask(group, width), token_rows.reshape(-1), slot))
        slot += ids.numel()
    return out


def batch_of_step(items: Sequence[EncodedItem], step: int, batch_size: int, seed: int, pad_id: int = 0) -> Batch:
    """The batch of training step ``step``: the item order is reshuffled each epoch from ``seed``
    alone, so a resumed or repeated run sees the same batches whatever ran before."""
    per_epoch = max(1, -(-len(items) // batch_size))
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(items))
    chosen = [items[i] for i in sorted(order[pos * batch_size : (pos + 1) * batch_size].tolist())]
    return make_batches(chosen, len(chosen), pad_id)[0]


def share(batches: Sequence[Batch], rank: int, world: int) -> tuple[list[Batch], np.ndarray]:
    """Process ``rank``'s share of a run's ``batches`` (batch ``i`` goes to rank ``i % world``) as a
    run of its own: slots packed from 0 and token rows renumbered ``0..n`` over its real tokens in
    their original order. Also returns each new token row's original one.

    Whole batches move, never items between batches, so every batch computes exactly what it would
    in one process whatever ``world`` is; the renumbering keeps each process's buffers (hidden
    states, routing arrays) the size of its own share.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    mine = [b for i, b in enumerate(batches) if i % world == rank]
    original = np.sort(np.concatenate([b.token_rows[b.token_rows >= 0] for b in mine])) if mine else np.zeros(0, np.int64)
    out, slot = [], 0
    for b in mine:
        rows = b.token_rows.copy()
        real = rows >= 0
        rows[real] = np.searchsorted(original, rows[real])
        out.append(replace(b, token_rows=rows, slot=slot))
        slot += b.size
    return out, original


def target_losses(batch: Batch, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Next-token cross-entropy (float32) at the batch's target positions, in row-major order.

    ``logits`` holds one row per True position of ``batch.loss_mask``, from the ``start``-th on (the
    targets and the loss are those of :mod:`uspx.engine.losses`).
    """
    return token_nll(logits, next_tokens(batch.input_ids, batch.loss_mask)[start : start + len(logits)])


def pad_id_of(tokenizer) -> int:
    for tok_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tok_id is not None:
            return int(tok_id)
    return 0
