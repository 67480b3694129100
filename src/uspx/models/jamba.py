"""jamba: MoE only every ``expert_layer_period`` layers (offset ``expert_layer_offset``), in
``feed_forward`` of both mamba and attention layers; the other layers have a dense MLP and no router,
which the generic scan skips. Router ``feed_forward.router``: softmax (fp32), top-k, not renormalised,
weights cast back to the logits' dtype. Experts in mixtral layout."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, softmax_topk


class JambaAdapter(MoEAdapter):
    family = "jamba"
    model_types = ("jamba",)
    expert_count_field = "num_experts"
    router_attr = "router"

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = softmax_topk(logits, layer.top_k, renormalize=False)
        return weights.to(logits.dtype), index
