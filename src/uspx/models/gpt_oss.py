"""gpt_oss: router ``mlp.router`` (weight [E, H], bias [E]); experts ``gate_up_proj`` [E, H, 2I] with
gate/up interleaved, ``down_proj`` [E, I, H], both with biases; top-k on logits, softmax over the k."""

from __future__ import annotations

import torch
from torch import nn

from uspx.io import UspxError
from uspx.models.base import KeptSet, MoEAdapter, MoELayer, topk_softmax


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    expert_count_field = "num_local_experts"
    router_attr = "router"
    router_expert_params = ("weight", "bias")
    pad_mechanism = "router bias set to -inf"

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax(logits, layer.top_k)

    def pad_to_uniform(self, kept: KeptSet, width: int | None = None) -> tuple[nn.Module, dict[int, list[int]]]:
        """Prune to the largest kept count; pad smaller layers with dead experts (router bias -inf).

        The filler slots get router weight 0 and bias -inf, so their logit is -inf for every token and
        top-k never picks them (every layer keeps >= top-k live experts); their expert weights are
        zeroed so nothing of the dropped experts survives in the file.
        """
        self.validate_kept(kept)
        width = width or max(len(v) for v in kept.values())
        if width < max(len(v) for v in kept.values()) or width > self.num_experts:
            raise UspxError(f"cannot pad to {width} experts per layer: the kept set or the model does not fit")
        fillers: dict[int, list[int]] = {}
        padded: dict[int, list[int]] = {}
        for layer in self.layers:
            ids = sorted(int(e) for e in kept[layer.index])
            spare = [e for e in range(layer.num_experts) if e not in set(ids)][: width - len(ids)]
            fillers[layer.index] = spare
            padded[layer.index] = sorted(ids + spare)
        model = self.prune(padded)
        new = type(self)(model)
        with torch.no_grad():
            for layer in new.layers:
                dead = [padded[layer.index].index(e) for e in fillers[layer.index]]
                if not dead:
                    continue
                slots = torch.tensor(dead, dtype=torch.long)
                layer.router.weight[slots] = 0
                layer.router.bias[slots] = float("-inf")
                for tensor in new.expert_tensors(layer).values():
                    tensor[slots] = 0
        return model, fillers
