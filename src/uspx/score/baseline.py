"""One forward pass of the unmodified model over the evaluated prompts.

It records what every model-based score compares against: each target token's loss, the routing
(to know which tokens each expert served, and to skip forwards that cannot change), and optionally
the expert output norms (REAP / EAN when the trace has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uspx.models import MoEAdapter
from uspx.progress import progress_bar
from uspx.score.loss import Batch, make_batches, token_losses
from uspx.score.trace_stats import RouterStats
from uspx.trace import RoutingRecorder
from uspx.workload import EncodedItem


@dataclass
class Baseline:
    items: list[EncodedItem]  # the evaluated prompts; "prompt position" = index in this list
    batches: list[Batch]
    losses: list[torch.Tensor]  # per batch: [B, T] target losses at predicting positions
    routed: list[torch.Tensor]  # per batch: [L, B, T, E] bool, token routed to expert (pads False)
    router: RouterStats  # per-prompt routing sums (with norms if asked)

    @property
    def n_prompts(self) -> int:
        return len(self.items)

    def loss_tokens(self) -> np.ndarray:
        """[P] number of target tokens per prompt."""
        out = np.zeros(self.n_prompts, np.int64)
        for b in self.batches:
            out[b.rows] = b.loss_mask.sum(1).numpy()
        return out

    def routed_loss_tokens(self) -> np.ndarray:
        """[P, L, E] target-predicting tokens routed to each expert."""
        l, e = len(self.router.layers), self.router.num_experts
        out = np.zeros((self.n_prompts, l, e), np.int64)
        for b, r in zip(self.batches, self.routed):
            sel = r & b.loss_mask[None, :, :, None]  # [L, B, T, E]
            out[b.rows] = sel.sum(2).permute(1, 0, 2).numpy()
        return out

    def hit(self, batch: int, layer_pos: int, expert: int) -> bool:
        """Whether any real token of the batch was routed to the expert (else no ablation can change it)."""
        return bool(self.routed[batch][layer_pos, :, :, expert].any())


def run_baseline(
    model: torch.nn.Module,
    adapter: MoEAdapter,
    items: list[EncodedItem],
    *,
    batch_size: int,
    pad_id: int,
    norms: bool = False,
    progress: bool = True,
) -> Baseline:
    layers = [l.index for l in adapter.layers]
    num_experts = adapter.num_experts
    batches = make_batches(items, batch_size, pad_id)
    stats = RouterStats.empty(np.array([e.index for e in items]), layers, num_experts, norms)
    losses, routed = [], []
    with torch.no_grad(), RoutingRecorder(adapter, norms=norms) as rec, progress_bar(
        "baseline", total=len(batches), unit="batches", enabled=progress
    ) as bar:
        for batch in batches:
            rec.clear()
            losses.append(token_losses(model, batch))
            b, t = batch.input_ids.shape
            prompt_of_row = np.repeat(np.array(batch.rows), t)
            prompt_of_row[~batch.real.numpy()] = -1
            stats.add_routing(prompt_of_row, rec.layers)
            hits = torch.zeros((len(layers), b * t, num_experts), dtype=torch.bool)
            for pos, layer in enumerate(layers):
                hits[pos].scatter_(1, rec.layers[layer].index.long(), True)
            hits &= batch.real[None, :, None]
            routed.append(hits.reshape(len(layers), b, t, num_experts))
            bar.advance()
    return Baseline(list(items), batches, losses, routed, stats)
