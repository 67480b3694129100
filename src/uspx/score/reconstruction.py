"""Reconstruction score, local to one layer: how much the MoE block's output moves when the expert
is removed, ``sum_t ||y_t - y_t^{-e}||^2`` over the calibration tokens routed to it, divided by all
calibration tokens of the prompts.

Removal is the *interventional* one (the expert is banned in the router and the next expert takes
its slot, weights recomputed by the family's routing), because that is what pruning does. The block
is re-run on its own inputs while the engine runs the model (``engine.observers.Reconstruction``),
so it needs no full-model forward per expert and runs layer by layer for models larger than memory.
A trace made with ``reconstruction`` already holds the sums (``reconstruction.npz``).

Under several processes each runs the batches ``engine.batches.share`` gives it (whole batches of
the single-process run) and the per-item sums are added across processes: an item's sums come from
the one process that ran its batch, so the result is the single-process one exactly.
"""

from __future__ import annotations

import numpy as np

from uspx.dist import Dist
from uspx.engine import WeightSource, make_batches, run
from uspx.engine.batches import share
from uspx.engine.observers import Reconstruction
from uspx.io import UspxError
from uspx.trace import Trace
from uspx.trace.run import DEFAULT_BATCH_TOKENS, RECONSTRUCTION
from uspx.workload import EncodedItem


def reconstruction_sums(source: WeightSource, items: list[EncodedItem], *, pad_id: int, batch_size: int = 8,
                        progress: bool = True, dist: Dist = Dist()) -> tuple[np.ndarray, np.ndarray]:
    """Per item: ([P, L, E] summed squared error, [P, L, E] routed tokens), in ``items``' order;
    ``dist``: this process's share of the batches (every process returns every item's sums)."""
    layers = [l.index for l in source.adapter.layers]
    batches = make_batches(items, batch_size, pad_id, max_tokens=None if source.resident else DEFAULT_BATCH_TOKENS)
    batches, _ = share(batches, dist.rank, dist.world)
    err = np.zeros((len(items), len(layers), source.adapter.num_experts))
    routed = np.zeros(err.shape, np.int64)
    if batches:  # a process may get none when there are more processes than batches
        n = sum(int(b.attention_mask.sum()) for b in batches)
        item_of_token = np.zeros(n, np.int64)
        for b in batches:
            real = b.token_rows >= 0
            item_of_token[b.token_rows[real]] = np.repeat(b.rows, b.input_ids.shape[1])[real]
        observer = Reconstruction(item_of_token, len(items))
        run(source, batches, [observer], last_layer=None if source.resident else max(layers), progress=progress,
            label="reconstruction")
        err = np.stack([observer.layers[l]["reconstruction_error"] for l in layers], axis=1)
        routed = np.stack([observer.layers[l]["reconstruction_routed"] for l in layers], axis=1)
    return dist.sum(err), dist.sum(routed)


def traced_sums(tr: Trace, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The sums a trace recorded for the prompts ``samples`` (None when it recorded none)."""
    path = tr.path / RECONSTRUCTION
    if not path.exists():
        return None
    with np.load(path) as z:
        pos = {int(s): i for i, s in enumerate(z["samples"])}
        if list(z["layers"]) != list(tr.moe_layers) or any(int(s) not in pos for s in samples):
            raise UspxError(f"{path}: does not cover this trace's layers and prompts")
        idx = [pos[int(s)] for s in samples]
        return z["err"][idx], z["routed"][idx]
