"""gpt_oss: router ``mlp.router`` (weight [E, H], bias [E]); experts ``gate_up_proj`` [E, H, 2I] with
gate/up interleaved, ``down_proj`` [E, I, H], both with biases; top-k on logits, softmax over the k."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, topk_softmax


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    expert_count_field = "num_local_experts"
    router_attr = "router"
    router_expert_params = ("weight", "bias")

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax(logits, layer.top_k)
