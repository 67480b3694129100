"""One forward pass of the unmodified model over the evaluated prompts.

It records what every model-based score compares against: each target token's loss, the routing
(to know which tokens each expert served, and to skip forwards that cannot change), optionally the
expert output norms (REAP / EAN when the trace has none) and the MoE block inputs (reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, H] real tokens
    block_prompt: np.ndarray | None = None  # [N] prompt position of each captured row

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
    block_inputs: bool = False,
    progress: bool = True,
) -> Baseline:
    layers = [l.index for l in adapter.layers]
    num_experts = adapter.num_experts
    batches = make_batches(items, batch_size, pad_id)
    stats = RouterStats.empty(np.array([e.index for e in items]), layers, num_experts, norms)
    captured: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    prompt_rows: list[np.ndarray] = []
    handles = []
    current: dict[str, torch.Tensor] = {}
    if block_inputs:
        for layer in adapter.layers:
            def pre_hook(module, args, kwargs, index=layer.index):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = hidden.detach().reshape(-1, hidden.shape[-1])
                captured[index].append(hidden[current["real"]].clone())

            handles.append(layer.block.register_forward_pre_hook(pre_hook, with_kwargs=True))
    losses, routed = [], []
    try:
        with torch.no_grad(), RoutingRecorder(adapter, norms=norms) as rec, progress_bar(
            "baseline", total=len(batches), unit="batches", enabled=progress
        ) as bar:
            for batch in batches:
                rec.clear()
                current["real"] = batch.real
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
                prompt_rows.append(prompt_of_row[prompt_of_row >= 0])
                bar.advance()
    finally:
        for h in handles:
            h.remove()
    base = Baseline(list(items), batches, losses, routed, stats)
    if block_inputs:
        base.block_inputs = {l: torch.cat(v) for l, v in captured.items()}
        base.block_prompt = np.concatenate(prompt_rows) if prompt_rows else np.zeros(0, np.int64)
    return base
