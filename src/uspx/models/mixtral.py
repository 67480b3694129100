"""mixtral: router ``mlp.gate`` (weight [E, H]); experts ``gate_up_proj`` [E, 2I, H] (gate rows first),
``down_proj`` [E, H, I]; softmax over all experts in fp32, top-k, renormalised (weights stay fp32)."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, softmax_topk


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    expert_count_field = "num_local_experts"

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_topk(logits, layer.top_k, renormalize=True)
