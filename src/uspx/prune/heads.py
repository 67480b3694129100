"""Fewer attention heads: whole KV groups (a key/value head with the query heads that read it),
the same number in every layer (a config holds one head count), each layer its own best groups.
A removed KV group shrinks the KV cache by its share for every token of context.

Group ``g``'s heads write ``o_proj`` through its columns only, so their contribution to the
attention output is ``x[:, cols_g] @ W_o[:, cols_g].T``; its score on the user's calibration
tokens is that contribution's norm per real token: exactly the output change removing the group
causes at that layer (``uspx.score.units``, method ``activation``). The export slices the query, key and value rows (and
biases) of the dropped groups, the ``o_proj`` columns, and per-head parameters such as gpt-oss's
attention sinks, and writes the head counts and ``head_dim`` into the config; it is reloaded with
stock ``from_pretrained`` and compared with the masked model (the dropped groups' ``o_proj``
columns zeroed).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.models.loading import model_from_state
from uspx.plan.memory import count_params, kv_cache_bytes
from uspx.score.units import score_units
from uspx.workload import EncodedItem


def group_scores(model: nn.Module, items: list[EncodedItem], pad_id: int = 0, batch_size: int = 8) -> torch.Tensor:
    """[layers, KV groups]: each group's contribution norm per calibration token on ``items`` (the
    ``activation`` score of :mod:`uspx.score.units`)."""
    us = score_units(model, items, ["heads"], ["activation"], pad_id=pad_id, batch_size=batch_size, bootstrap=0)
    return torch.stack([torch.from_numpy(us.matrix("kv_group", "activation", l)) for l in us.layers("kv_group")])


def kept_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[layers, n]: each layer's ``n`` best KV groups, in increasing order."""
    if not 1 <= n <= scores.shape[1]:
        raise UspxError(f"KV groups kept per layer must lie in 1..{scores.shape[1]}, not {n}")
    return torch.topk(scores, n, dim=1, sorted=False).indices.sort(dim=1).values


def _rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    """The projection rows (or ``o_proj`` columns) of ``heads`` of ``hd`` channels each."""
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def group_heads(groups: torch.Tensor, rep: int) -> torch.Tensor:
    """[layers, n * rep]: every query head of the KV groups ``groups`` [layers, n]."""
    return (groups[..., None] * rep + torch.arange(rep)).reshape(groups.shape[0], -1)


def masked_heads(model: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose dropped query heads write nothing (their ``o_proj`` columns zeroed);
    ``kept`` [layers, n] holds the query heads each layer keeps."""
    out = copy.deepcopy(model)
    adapter = adapter_for(out)
    for i, a in enumerate(adapter.attention_modules(out)):
        mask_query_heads(adapter, a, kept[i].tolist())
    return out


def mask_query_heads(adapter, attn: nn.Module, kept: list[int]) -> None:
    """Zero, in place, the ``o_proj`` columns of the query heads of ``attn`` not in ``kept``."""
    heads, _, hd = adapter.head_shape()
    drop = torch.tensor([h for h in range(heads) if h not in set(kept)], dtype=torch.long)
    if len(drop):
        with torch.no_grad():
            adapter.attention_out(attn).weight[:, _rows(drop, hd)] = 0.0


def narrowed_heads(model: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A new model of the same family keeping only the ``kept`` query heads [layers, n] of every
    layer: the same number of heads in each of the same number of KV groups (a config holds one
    layout), the key and value heads of groups with no kept head removed."""
    adapter = adapter_for(model)
    heads, kv, hd = adapter.head_shape()
    rep = heads // kv
    per_layer = [Counter(h // rep for h in row) for row in kept.tolist()]
    if len({len(c) for c in per_layer}) != 1 or len({n for c in per_layer for n in c.values()}) != 1:
        raise UspxError("kept query heads must be the same number in each of the same number of KV groups in every layer")
    groups = [sorted(c) for c in per_layer]
    config = copy.deepcopy(model.config)
    adapter.set_head_shape(config, kept.shape[1], len(groups[0]), hd)
    state = dict(model.state_dict())
    prefix = {id(a): name for name, a in model.named_modules()}
    for i, a in enumerate(adapter.attention_modules(model)):
        p = prefix[id(a)]
        q_rows = _rows(kept[i], hd)
        kv_rows = _rows(torch.tensor(groups[i]), hd)
        by_rows = [(adapter.query_proj, q_rows)] + [(proj, kv_rows) for proj in adapter.key_value_projs]
        for proj, rows in by_rows:
            module = getattr(a, proj)
            state[f"{p}.{proj}.weight"] = module.weight.detach()[rows]
            if module.bias is not None:
                state[f"{p}.{proj}.bias"] = module.bias.detach()[rows]
        state[f"{p}.{adapter.output_proj}.weight"] = adapter.attention_out(a).weight.detach()[:, q_rows]
        for name in adapter.per_head_params:
            state[f"{p}.{name}"] = getattr(a, name).detach()[kept[i]]
    return model_from_state(config, state, next(model.parameters()).dtype)


def kv_bytes_per_token(config, kv_dtype: str = "bf16") -> int:
    """KV cache bytes one token of context costs (every layer), from the config."""
    return kv_cache_bytes(count_params(config), 1, kv_dtype)
