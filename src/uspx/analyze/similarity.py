"""Section 5, expert similarity and merge candidates.

Weight similarity: cosine between experts of one layer over all their fused tensors, flattened per
expert (expert id on dim 0, from ``adapter.expert_tensors``). Output similarity: both experts run
on the same routed tokens (``adapter.expert_outputs``), mean cosine of their outputs. Causal check:
merge the most similar pair (average their weights, copy the average into both slots, so routing to
either id reaches the merged expert) and measure the held-out loss change, next to random pairs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from uspx.analyze.collect import Capture, heldout_losses
from uspx.analyze.stats import bootstrap_ratio
from uspx.models.base import MoEAdapter, MoELayer


def flat_experts(adapter: MoEAdapter, layer: MoELayer) -> torch.Tensor:
    tensors = adapter.expert_tensors(layer)
    return torch.cat([t.detach().float().reshape(layer.num_experts, -1) for _, t in sorted(tensors.items())], dim=1)


def weight_cosine(adapter: MoEAdapter, layer: MoELayer) -> torch.Tensor:
    w = torch.nn.functional.normalize(flat_experts(adapter, layer), dim=1)
    return w @ w.T


@torch.no_grad()
def output_cosine(adapter: MoEAdapter, layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor,
                  max_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean output cosine of every expert pair over the tokens routed to either of the two.

    Returns (cosine [E, E], tokens behind each cell [E, E]).
    """
    hidden, ids = hidden[:max_tokens], ids[:max_tokens]
    E = layer.num_experts
    every = torch.arange(E).expand(hidden.shape[0], E)
    out = torch.nn.functional.normalize(adapter.expert_outputs(layer, hidden, every).float(), dim=-1)  # [N, E, H]
    routed = torch.zeros(hidden.shape[0], E, dtype=torch.bool)
    routed.scatter_(1, ids, True)
    cos = torch.einsum("neh,nfh->nef", out, out)  # [N, E, E]
    union = (routed[:, :, None] | routed[:, None, :]).float()
    n = union.sum(0)
    return (cos * union).sum(0) / n.clamp(min=1), n


@contextlib.contextmanager
def merged(adapter: MoEAdapter, layer: MoELayer, a: int, b: int) -> Iterator[None]:
    """Experts a and b of ``layer`` both hold the average of their weights for the block."""
    tensors = adapter.expert_tensors(layer)
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in tensors.items():
            saved[name] = t[[a, b]].clone()
            t[a] = t[b] = (t[a] + t[b]) / 2
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in tensors.items():
                t[a], t[b] = saved[name]


def similarity(lm, adapter: MoEAdapter, cap: Capture | None, items, pad_id: int, n_random: int = 3,
               seed: int = 0, batch_size: int = 8) -> dict:
    layers = adapter.layers
    per_layer = []
    best = None
    for li, layer in enumerate(layers):
        wc = weight_cosine(adapter, layer)
        off = wc.clone()
        off.fill_diagonal_(float("-inf"))
        a, b = divmod(int(off.argmax()), layer.num_experts)
        row = dict(layer=layer.index, weight_cosine=wc.numpy(), most_similar=[a, b], max_cosine=float(off.max()),
                   mean_offdiag=float(wc[~torch.eye(layer.num_experts, dtype=torch.bool)].mean()))
        if cap is not None:
            oc, n = output_cosine(adapter, layer, cap.router_in[:, li], cap.ids[:, li])
            row.update(output_cosine=oc.numpy(), output_tokens=n.numpy(), output_tokens_total=int(min(1024, len(cap.sample))),
                       pair_output_cosine=float(oc[a, b]))
        per_layer.append(row)
        if best is None or row["max_cosine"] > best[0]:
            best = (row["max_cosine"], li, a, b)
    out = dict(layers=per_layer)
    if items:
        base = heldout_losses(lm.model, items, pad_id, batch_size)
        rng = np.random.default_rng(seed)
        trials = [("most_similar", best[1], best[2], best[3])]
        for _ in range(n_random):
            li = int(rng.integers(len(layers)))
            a, b = rng.choice(layers[li].num_experts, size=2, replace=False)
            trials.append(("random", li, int(a), int(b)))
        merges = []
        for kind, li, a, b in trials:
            with merged(adapter, layers[li], a, b):
                res = heldout_losses(lm.model, items, pad_id, batch_size)
            d = bootstrap_ratio(res.nll - base.nll, base.tokens)
            merges.append(dict(kind=kind, layer=layers[li].index, a=a, b=b,
                               weight_cosine=float(per_layer[li]["weight_cosine"][a, b]),
                               delta_loss=float(d["value"]), lo=float(d["lo"]), hi=float(d["hi"]),
                               tokens=int(base.tokens.sum()), items=len(items)))
        out.update(base_loss=float(base.nll.sum() / base.tokens.sum()), merges=merges)
    return out
