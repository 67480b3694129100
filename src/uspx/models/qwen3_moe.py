"""qwen3_moe: as qwen2_moe without the shared expert (same router code: softmax, top-k, renormalise
only if ``norm_topk_prob``, weights in the logits' dtype)."""

from __future__ import annotations

from uspx.models.qwen2_moe import Qwen2MoeAdapter


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    # The config maps num_experts -> num_local_experts (attribute_map); either name reads and writes it.
    expert_count_field = "num_experts"
