"""dbrx: block ``transformer.blocks.N.ffn`` with router ``ffn.router`` (returns logits only; weight in
``router.layer.weight`` [E, H]) and experts ``ffn.experts.mlp.{w1, v1, w2}``, each flattened to
[E * F, H] (w1 gate, v1 up, w2 down used as ``x @ w2``). Routing: softmax in the logits' dtype, top-k,
weights divided by their ``moe_normalize_expert_weights``-norm (none if that is None).
The count and top-k live in ``ffn_config``."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer
from uspx.models.params import ModelParams, Part, linear


class DbrxAdapter(MoEAdapter):
    family = "dbrx"
    model_types = ("dbrx",)
    expert_count_field = "ffn_config.moe_num_experts"
    top_k_field = "ffn_config.moe_top_k"
    expert_width_field = "ffn_config.ffn_hidden_size"
    router_attr = "router"
    router_expert_params = ("layer.weight",)
    router_returns_tuple = False
    layer_pattern = r"blocks\.(\d+)\."
    decoder_layers_attr = "blocks"
    final_norm_attr = "norm_f"
    attention_projections = ("Wqkv", "out_proj")
    attention_attr = "norm_attn_norm.attn"
    expert_call_module = "mlp"  # DbrxExperts loops over its experts calling mlp(x, w1, v1, w2) for each

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """Fused Wqkv, bias-free LayerNorms, every block MoE with experts flattened to [E*F, H]
        (w1, v1, w2 of width ``ffn_config.ffn_hidden_size``); the LM head is never tied."""
        h, n_layers = cfg.d_model, cfg.n_layers
        hd, nkv = h // cfg.n_heads, cfg.attn_config.kv_n_heads
        other = {
            "embeddings": Part(cfg.vocab_size * h),
            "lm_head": linear(h, cfg.vocab_size),
            "attention": (linear(h, h + 2 * nkv * hd) + linear(h, h)) * n_layers,
            "norms": Part(vector=h) * (2 * n_layers + 1),
        }
        return ModelParams(
            model_type=cfg.model_type, num_layers=n_layers, moe_layers=tuple(range(n_layers)),
            num_experts=cls.config_num_experts(cfg), top_k=cfg.ffn_config.moe_top_k,
            expert=Part(3 * h * cfg.ffn_config.ffn_hidden_size), router_row=Part(h), other=other,
            kv_per_token=(2 * nkv * hd,) * n_layers, window=(None,) * n_layers,
        )

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits, dim=1, dtype=logits.dtype)
        weights, index = torch.topk(probs, layer.top_k, dim=-1)
        p = self.config.ffn_config.moe_normalize_expert_weights
        if p is not None:
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        return weights, index

    def expert_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        # Views [E, F, H] of the flattened [E * F, H] parameters, so the base sees expert-first tensors.
        return {
            f"mlp.{n}": p.view(layer.num_experts, -1, p.shape[-1])
            for n, p in layer.experts.mlp.named_parameters(recurse=False)
        }
