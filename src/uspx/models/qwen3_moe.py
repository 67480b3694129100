"""qwen3_moe: as qwen2_moe without the shared expert (same router code: softmax, top-k, renormalise
only if ``norm_topk_prob``, weights in the logits' dtype)."""

from __future__ import annotations

from uspx.models.params import ModelParams, decoder_params
from uspx.models.qwen2_moe import Qwen2MoeAdapter, sparse_layers


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    # The config maps num_experts -> num_local_experts (attribute_map); either name reads and writes it.
    expert_count_field = "num_experts"

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """q/k/v/o biases follow ``attention_bias``; per-head RMSNorm on q and k; experts of width
        ``moe_intermediate_size``; MoE layers picked as in qwen2_moe."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.moe_intermediate_size,
                              moe_layers=sparse_layers(cfg), qkv_bias=bias, o_bias=bias, qk_norm="head")
