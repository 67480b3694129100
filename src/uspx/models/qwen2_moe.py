"""qwen2_moe: router ``mlp.gate``; experts as mixtral ([E, 2I, H] / [E, H, I]) plus a dense
``shared_expert`` with a sigmoid gate (not a routed expert: it counts in ``other_bytes``). Softmax over
all experts, top-k, renormalised only if ``norm_topk_prob``; weights cast back to the logits' dtype.
Layers in ``mlp_only_layers`` or off ``decoder_sparse_step`` are dense and have no router."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, softmax_topk
from uspx.models.params import ModelParams, decoder_params


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    expert_count_field = "num_experts"
    expert_width_field = "moe_intermediate_size"
    single_expert_weight_is_one = True
    # the shared expert (its own width, a sigmoid gate on its output), and the MLP of dense layers
    dense_mlp_paths = (("mlp.shared_expert", "shared_expert_intermediate_size", "mlp.shared_expert_gate"),
                       ("mlp", "intermediate_size", None))

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """q/k/v biases follow ``qkv_bias`` (o has none); experts of width ``moe_intermediate_size``;
        a shared expert of width ``shared_expert_intermediate_size`` in every MoE layer."""
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.moe_intermediate_size,
                              moe_layers=sparse_layers(cfg), qkv_bias=bool(getattr(cfg, "qkv_bias", False)),
                              shared_expert_inter=cfg.shared_expert_intermediate_size)

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = softmax_topk(logits, layer.top_k, renormalize=bool(self.config.norm_topk_prob))
        return weights.to(logits.dtype), index


def sparse_layers(cfg) -> tuple[int, ...]:
    """The MoE layers of a qwen config: every ``decoder_sparse_step``-th layer not in ``mlp_only_layers``."""
    dense, step = set(getattr(cfg, "mlp_only_layers", None) or []), cfg.decoder_sparse_step
    return tuple(i for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
