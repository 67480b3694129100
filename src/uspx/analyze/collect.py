"""Model-side helpers shared by the sections that need a model: the workload's tokens, held-out
loss, and one forward pass capturing router inputs, attention outputs and routing per MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from uspx.models.base import MoEAdapter, MoELayer
from uspx.trace.capture import RoutingRecorder
from uspx.engine.forward import forward, logits as target_logits
from uspx.engine.batches import make_batches, pad_id_of
from uspx.engine.losses import next_tokens, token_nll
from uspx.engine.hooks import decoder_layer, forward_hook, hooked, pre_hook
from uspx.workload import EncodedItem, encode, load_workload


def workload_items(lm, workload, split: str, max_items: int | None, max_length: int = 512) -> list[EncodedItem]:
    wl = workload if hasattr(workload, "items") else load_workload(workload)
    items = encode(wl, lm.tokenizer, max_length)
    items = [e for e in items if (split == "all" or e.split == split) and len(e.input_ids) >= 2]
    return items[:max_items] if max_items else items


@dataclass
class Losses:
    """Per item: summed NLL and token count over the scored tokens, and the argmax predictions."""

    nll: np.ndarray  # [items]
    tokens: np.ndarray  # [items]
    argmax: list[torch.Tensor]  # per item, predictions at its scored positions


def heldout_losses(model: nn.Module, items: list[EncodedItem], pad_id: int, batch_size: int = 8) -> Losses:
    """Next-token loss on each item's completion tokens (all tokens for items without a completion)."""
    nll, count, preds = [], [], []
    for batch in make_batches(items, batch_size, pad_id, by_length=False):
        logits = target_logits(model, batch)  # [N, V] at the target positions, row after row
        tok_nll = token_nll(logits, next_tokens(batch.input_ids, batch.loss_mask))
        per_row = batch.loss_mask.sum(1).tolist()
        for row_nll, row_logits in zip(tok_nll.split(per_row), logits.split(per_row)):
            nll.append(float(row_nll.double().sum()))
            count.append(len(row_nll))
            preds.append(row_logits.argmax(-1))
    return Losses(np.array(nll), np.array(count), preds)


def attention_module(adapter: MoEAdapter, layer: MoELayer) -> nn.Module | None:
    """The self-attention module of the decoder layer holding this MoE block (None if it has none)."""
    return adapter.attention(decoder_layer(adapter, layer))


@dataclass
class Capture:
    """Per real token (in item order) and MoE layer: router input, attention output, routing."""

    sample: np.ndarray  # [N] item index
    split: np.ndarray  # [N] "calibration" / "heldout"
    token: np.ndarray  # [N]
    router_in: torch.Tensor  # [N, L, H]
    attn_out: torch.Tensor | None  # [N, L, H]
    ids: torch.Tensor  # [N, L, k]
    weights: torch.Tensor  # [N, L, k]

    @property
    def top1(self) -> torch.Tensor:
        return self.ids.gather(-1, self.weights.argmax(-1, keepdim=True))[..., 0]


@torch.no_grad()
def capture(lm, adapter: MoEAdapter, items: list[EncodedItem], batch_size: int = 8, attention: bool = True) -> Capture:
    layers = adapter.layers
    attn_mods = {l.index: attention_module(adapter, l) for l in layers} if attention else {}
    store: dict[str, dict[int, torch.Tensor]] = {"in": {}, "attn": {}}
    hooks = []
    for l in layers:
        hooks.append(pre_hook(l.experts, _keep(store["in"], l.index)))
        if attn_mods.get(l.index) is not None:
            hooks.append(forward_hook(attn_mods[l.index], _keep_out(store["attn"], l.index)))
    rows: dict[str, list] = {k: [] for k in ("sample", "split", "token", "in", "attn", "ids", "w")}
    with hooked(hooks), RoutingRecorder(adapter) as rec:
        for batch in make_batches(items, batch_size, pad_id_of(lm.tokenizer), by_length=False):
            rec.clear()
            group, ids, real = batch.items, batch.input_ids, batch.real
            forward(lm, ids, batch.attention_mask, head=False)  # the hooks keep what is needed: no LM head
            b, t = ids.shape
            rows["sample"].append(np.repeat([e.index for e in group], t)[real.numpy()])
            rows["split"].append(np.repeat([e.split for e in group], t)[real.numpy()])
            rows["token"].append(ids.reshape(-1)[real].numpy())
            rows["in"].append(torch.stack([store["in"][l.index].reshape(b * t, -1)[real] for l in layers], 1))
            if len(store["attn"]) == len(layers):
                rows["attn"].append(torch.stack([store["attn"][l.index].reshape(b * t, -1)[real] for l in layers], 1))
            rows["ids"].append(torch.stack([rec.layers[l.index].index[real] for l in layers], 1))
            rows["w"].append(torch.stack([rec.layers[l.index].weights[real].float() for l in layers], 1))
    return Capture(
        np.concatenate(rows["sample"]), np.concatenate(rows["split"]), np.concatenate(rows["token"]),
        torch.cat(rows["in"]).float(), torch.cat(rows["attn"]).float() if rows["attn"] else None,
        torch.cat(rows["ids"]).long(), torch.cat(rows["w"]),
    )


def _keep(store: dict, index: int):
    def hook(module, args):
        store[index] = args[0].detach()

    return hook


def _keep_out(store: dict, index: int):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        store[index] = out.detach()

    return hook
