"""olmoe: the qwen router (softmax, top-k, renormalise only if ``norm_topk_prob``, default off) and
mixtral-layout experts; every layer is MoE."""

from __future__ import annotations

from uspx.models.qwen2_moe import Qwen2MoeAdapter


class OlmoeAdapter(Qwen2MoeAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    expert_count_field = "num_experts"
