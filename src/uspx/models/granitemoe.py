"""granitemoe: router ``block_sparse_moe.router`` returns fp32 logits; top-k on the logits, softmax over
the k, weights cast to the model's dtype. Experts in mixtral layout."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, topk_softmax


class GraniteMoeAdapter(MoEAdapter):
    family = "granitemoe"
    model_types = ("granitemoe",)
    expert_count_field = "num_local_experts"
    router_attr = "router"

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = topk_softmax(logits.float(), layer.top_k)
        # The logits are fp32 whatever the model dtype; the weights go back to the hidden states' dtype.
        return weights.to(layer.router.weight.dtype), index
