"""Attribution patching for channels and heads: one forward and one backward estimate what removing
every unit would cost, checked against true removal on a sample.

A unit writes the model's residual stream through a block of columns of one projection: channel
``c`` of expert ``e`` through column ``c`` of that expert's down projection, KV group ``g`` through
the ``o_proj`` columns of its query heads. Scaling that block by ``m`` and removing the unit is
``m: 1 -> 0``, so to first order the loss changes by ``-dL/dm = -<grad W_block, W_block>``. The loss
is the token-weighted mean next-token loss on the items' target tokens, as everywhere in uspx.

:func:`validate` removes a sample of units for real (the block zeroed, the loss measured again) and
reports the rank correlation (Spearman) between the estimates and the true changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from uspx.models import adapter_for
from uspx.workload import EncodedItem


@dataclass
class Attribution:
    channels: dict[int, torch.Tensor]  # MoE layer -> [E, I] estimated loss change of removing each channel
    groups: torch.Tensor  # [decoder layers, KV groups]
    loss: float  # the loss the estimates are taken at


def _units(model: nn.Module):
    """(per MoE layer: its down projections and their channel layout, per decoder layer: its output
    projection and the input columns of each KV group)."""
    from uspx.score.units import _head_columns

    adapter = adapter_for(model)
    width = adapter.expert_width()
    channels = {l.index: (adapter.expert_down(l), adapter.expert_down_layout(l, width)) for l in adapter.layers}
    _, group_cols = _head_columns(adapter)
    return channels, [(adapter.attention_out(a).weight, group_cols) for a in adapter.attention_modules(model)]


def mean_loss(model: nn.Module, items: list[EncodedItem], pad_id: int = 0, batch_size: int = 8,
              grad: bool = False) -> torch.Tensor:
    """Token-weighted mean next-token loss over the items' target tokens (differentiable with ``grad``)."""
    from uspx.engine import make_batches
    from uspx.score.loss import token_losses

    total, count = None, 0
    with torch.set_grad_enabled(grad):
        for batch in make_batches(items, batch_size, pad_id):
            losses = token_losses(model, batch)
            part = (losses * batch.loss_mask).sum()
            total = part if total is None else total + part
            count += int(batch.loss_mask.sum())
    return total / max(count, 1)


def attribution(model: nn.Module, items: list[EncodedItem], pad_id: int = 0, batch_size: int = 8) -> Attribution:
    """The first-order estimate of every channel's and every KV group's removal (see the module doc;
    computed per prompt by :func:`uspx.score.units.gradient_scores`)."""
    from uspx.score.units import gradient_scores, UnitScores

    us = UnitScores(gradient_scores(model, items, ["channels", "heads"], pad_id=pad_id, bootstrap=0)["attribution"])
    channels = {l: torch.from_numpy(us.matrix("channel", "attribution", l)) for l in us.layers("channel")}
    groups = torch.stack([torch.from_numpy(us.matrix("kv_group", "attribution", l)) for l in us.layers("kv_group")])
    return Attribution(channels, groups, float(mean_loss(model, items, pad_id, batch_size)))


def validate(model: nn.Module, items: list[EncodedItem], est: Attribution, *, channels: int = 64,
             seed: int = 0, pad_id: int = 0, batch_size: int = 8) -> dict:
    """True removal of every KV group and of ``channels`` random channels: the loss change measured,
    and its Spearman rank correlation with the estimates (per unit type)."""
    chan_units, group_units = _units(model)
    base = float(mean_loss(model, items, pad_id, batch_size))
    rng = np.random.default_rng(seed)
    layers = sorted(chan_units)
    picks = [(layers[rng.integers(len(layers))], int(rng.integers(est.channels[layers[0]].shape[0])),
              int(rng.integers(est.channels[layers[0]].shape[1]))) for _ in range(channels)]
    true_c, est_c = [], []
    with torch.no_grad():
        for layer, e, c in picks:
            w, (dim, index) = chan_units[layer]
            cols = index[c]
            saved = w[e].index_select(dim - 1, cols).clone()
            w[e].index_fill_(dim - 1, cols, 0.0)
            true_c.append(float(mean_loss(model, items, pad_id, batch_size)) - base)
            w[e].index_copy_(dim - 1, cols, saved)
            est_c.append(float(est.channels[layer][e, c]))
        true_g, est_g = [], []
        for i, (w, blocks) in enumerate(group_units):
            for g, cols in enumerate(blocks):
                saved = w[:, cols].clone()
                w[:, cols] = 0.0
                true_g.append(float(mean_loss(model, items, pad_id, batch_size)) - base)
                w[:, cols] = saved
                est_g.append(float(est.groups[i, g]))
    return dict(base_loss=base,
                channels=dict(units=len(true_c), spearman=spearman(est_c, true_c), true=true_c, estimate=est_c),
                groups=dict(units=len(true_g), spearman=spearman(est_g, true_g), true=true_g, estimate=est_g))


def spearman(a, b) -> float | None:
    """Rank correlation (average ranks for ties)."""
    if len(a) < 3:
        return None

    def ranks(x):  # 0-based; ties share their mean rank
        _, inverse, count = np.unique(np.asarray(x, dtype=float), return_inverse=True, return_counts=True)
        return (np.cumsum(count) - (count + 1) / 2)[inverse]

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])
