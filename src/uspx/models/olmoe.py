"""olmoe: the qwen router (softmax, top-k, renormalise only if ``norm_topk_prob``, default off) and
mixtral-layout experts; every layer is MoE."""

from __future__ import annotations

from uspx.models.params import ModelParams, decoder_params
from uspx.models.qwen2_moe import Qwen2MoeAdapter


class OlmoeAdapter(Qwen2MoeAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    expert_width_field = "intermediate_size"

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """q/k/v/o biases follow ``attention_bias``; RMSNorms over the whole q and k projections;
        experts of width ``intermediate_size``."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.intermediate_size,
                              qkv_bias=bias, o_bias=bias, qk_norm="full")
