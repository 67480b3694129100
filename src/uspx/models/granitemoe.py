"""granitemoe: router ``block_sparse_moe.router`` returns fp32 logits; top-k on the logits, softmax over
the k, weights cast to the model's dtype. Experts in mixtral layout."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, topk_softmax
from uspx.models.params import ModelParams, decoder_params


class GraniteMoeAdapter(MoEAdapter):
    family = "granitemoe"
    model_types = ("granitemoe",)
    router_attr = "router"
    logits_divisor_field = "logits_scaling"

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """q/k/v/o biases follow ``attention_bias``; experts of width ``intermediate_size``."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.intermediate_size,
                              qkv_bias=bias, o_bias=bias)

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = topk_softmax(logits.float(), layer.top_k)
        # The logits are fp32 whatever the model dtype; the weights go back to the hidden states' dtype.
        return weights.to(layer.router.weight.dtype), index
