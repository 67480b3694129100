"""dbrx: block ``transformer.blocks.N.ffn`` with router ``ffn.router`` (returns logits only; weight in
``router.layer.weight`` [E, H]) and experts ``ffn.experts.mlp.{w1, v1, w2}``, each flattened to
[E * F, H] (w1 gate, v1 up, w2 down used as ``x @ w2``). Routing: softmax in the logits' dtype, top-k,
weights divided by their ``moe_normalize_expert_weights``-norm (none if that is None).
The count and top-k live in ``ffn_config``."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer


class DbrxAdapter(MoEAdapter):
    family = "dbrx"
    model_types = ("dbrx",)
    expert_count_field = "ffn_config.moe_num_experts"
    top_k_field = "ffn_config.moe_top_k"
    router_attr = "router"
    router_expert_params = ("layer.weight",)
    router_returns_tuple = False
    layer_pattern = r"blocks\.(\d+)\."

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits, dim=1, dtype=logits.dtype)
        weights, index = torch.topk(probs, layer.top_k, dim=-1)
        p = self.config.ffn_config.moe_normalize_expert_weights
        if p is not None:
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        return weights, index

    def _expert_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        # Views [E, F, H] of the flattened [E * F, H] parameters, so the base sees expert-first tensors.
        return {
            f"mlp.{n}": p.view(layer.num_experts, -1, p.shape[-1])
            for n, p in layer.experts.mlp.named_parameters(recurse=False)
        }

    def _slice(self, layer: MoELayer, name: str, tensor: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if name.endswith(".router.layer.weight"):
            return tensor.index_select(0, ids).clone()
        kept = tensor.view(layer.num_experts, -1, tensor.shape[-1]).index_select(0, ids)
        return kept.reshape(-1, tensor.shape[-1]).clone()
