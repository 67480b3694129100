"""NAEE-style reconstruction score, local to one layer: how much the MoE block's output moves when
the expert is removed, ``mean_t ||y_t - y_t^{-e}||^2`` over all calibration tokens.

Removal is the *interventional* one (the expert is banned in the router and the next expert takes
its slot, weights recomputed by the family's routing), because that is what pruning does. The
block is re-run on its captured inputs, no full-model forward per expert. A MoE block treats tokens
independently, so only the tokens routed to ``e`` can change: the others contribute exactly 0 and
are not recomputed.
"""

from __future__ import annotations

import numpy as np
import torch

from uspx.models import MoEAdapter
from uspx.score.baseline import Baseline
from uspx.trace import RoutingRecorder

CHUNK = 4096  # rows per block call, to bound memory on long calibration sets


def _block_out(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x[None])
    if isinstance(out, tuple):  # gpt_oss returns (hidden, router_scores)
        out = out[0]
    return out.reshape(x.shape[0], -1)


def run_reconstruction(adapter: MoEAdapter, base: Baseline, bar) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt ([P, L, E] summed squared error, [P, L, E] routed tokens) from the captured inputs."""
    p, e_count = base.n_prompts, adapter.num_experts
    shape = (p, len(adapter.layers), e_count)
    err = np.zeros(shape)
    routed = np.zeros(shape, np.int64)
    prompt = base.block_prompt
    with torch.no_grad():
        for pos, layer in enumerate(adapter.layers):
            x_all = base.block_inputs[layer.index]
            for start in range(0, x_all.shape[0], CHUNK):
                x = x_all[start : start + CHUNK]
                rows_prompt = prompt[start : start + CHUNK]
                # the routing of these rows as the block itself computes it (not the full-model
                # pass's), so "routed to e" and "changes when e is banned" agree exactly
                with RoutingRecorder(adapter) as rec:
                    y = _block_out(layer.block, x)
                index = rec.layers[layer.index].index
                for expert in range(e_count):
                    rows = (index == expert).any(dim=1)
                    if not rows.any():
                        continue
                    kept = [e for e in range(e_count) if e != expert]
                    with adapter.restrict({layer.index: kept}):
                        y_e = _block_out(layer.block, x[rows])
                    d = (y[rows].double() - y_e.double()).pow(2).sum(dim=1).numpy()
                    rp = rows_prompt[rows.numpy()]
                    err[:, pos, expert] += np.bincount(rp, weights=d, minlength=p)
                    routed[:, pos, expert] += np.bincount(rp, minlength=p)
            bar.advance()
    return err, routed
