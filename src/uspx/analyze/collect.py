"""Model-side helpers shared by the sections that need a model: the workload's tokens, held-out
loss, and one forward pass capturing router inputs, attention outputs and routing per MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from uspx.models.base import MoEAdapter, MoELayer
from uspx.trace.capture import RoutingRecorder
from uspx.engine.batches import pad_id_of, padded
from uspx.engine.hooks import forward_hook, hooked, pre_hook
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


@torch.no_grad()
def heldout_losses(model: nn.Module, items: list[EncodedItem], pad_id: int, batch_size: int = 8) -> Losses:
    """Next-token loss on each item's completion tokens (all tokens for items without a completion)."""
    nll, count, preds = [], [], []
    for group, ids, mask in padded(items, batch_size, pad_id):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        tok_nll = -logp.gather(-1, target[..., None])[..., 0]
        for r, e in enumerate(group):
            first = max(e.completion_start, 1) - 1  # logits at t-1 predict token t
            last = len(e.input_ids) - 1
            nll.append(float(tok_nll[r, first:last].double().sum()))
            count.append(last - first)
            preds.append(logits[r, first:last].argmax(-1))
    return Losses(np.array(nll), np.array(count), preds)


def attention_module(adapter: MoEAdapter, layer: MoELayer) -> nn.Module | None:
    """The self-attention module of the decoder layer holding this MoE block (None if it has none)."""
    return adapter.attention(adapter.model.get_submodule(layer.name.rsplit(".", 1)[0]))


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
        for group, ids, mask in padded(items, batch_size, pad_id_of(lm.tokenizer)):
            rec.clear()
            lm.model(input_ids=ids, attention_mask=mask)
            real = mask.reshape(-1).bool()
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
