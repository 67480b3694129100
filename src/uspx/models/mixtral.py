"""mixtral: router ``mlp.gate`` (weight [E, H]); experts ``gate_up_proj`` [E, 2I, H] (gate rows first),
``down_proj`` [E, H, I]; softmax over all experts in fp32, top-k, renormalised (weights stay fp32)."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, softmax_topk
from uspx.models.params import ModelParams, decoder_params


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    single_expert_weight_is_one = True

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """No biases anywhere; every layer MoE; experts of width ``intermediate_size``."""
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.intermediate_size)

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_topk(logits, layer.top_k, renormalize=True)
