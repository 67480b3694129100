"""qwen2_moe: router ``mlp.gate``; experts as mixtral ([E, 2I, H] / [E, H, I]) plus a dense
``shared_expert`` with a sigmoid gate (not a routed expert: it counts in ``other_bytes``). Softmax over
all experts, top-k, renormalised only if ``norm_topk_prob``; weights cast back to the logits' dtype.
Layers in ``mlp_only_layers`` or off ``decoder_sparse_step`` are dense and have no router."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, softmax_topk


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    expert_count_field = "num_experts"

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = softmax_topk(logits, layer.top_k, renormalize=bool(self.config.norm_topk_prob))
        return weights.to(logits.dtype), index
