"""jamba: MoE only every ``expert_layer_period`` layers (offset ``expert_layer_offset``), in
``feed_forward`` of both mamba and attention layers; the other layers have a dense MLP and no router,
which the generic scan skips. Router ``feed_forward.router``: softmax (fp32), top-k, not renormalised,
weights cast back to the logits' dtype. Experts in mixtral layout."""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer, softmax_topk
from uspx.models.params import ModelParams, Part, glu_mlp, linear, lm_head


class JambaAdapter(MoEAdapter):
    family = "jamba"
    model_types = ("jamba",)
    expert_count_field = "num_experts"
    router_attr = "router"
    final_norm_attr = "final_layernorm"

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """Mamba layers, attention where ``layers_block_type`` says so, MoE where
        ``layers_num_experts`` is above 1 (a dense MLP of ``intermediate_size`` elsewhere)."""
        h, n_layers, r, st = cfg.hidden_size, cfg.num_hidden_layers, cfg.mamba_dt_rank, cfg.mamba_d_state
        inner, kern, pb = cfg.mamba_expand * h, cfg.mamba_d_conv, bool(cfg.mamba_proj_bias)
        hd, nq, nkv = h // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
        attn_ids = [i for i, t in enumerate(cfg.layers_block_type) if t == "attention"]
        # conv weights, A_log, D and the three small norms are not Linear layers: no quantizer touches them
        mamba = (linear(h, 2 * inner, pb) + linear(inner, r + 2 * st) + linear(r, inner, True)
                 + linear(inner, h, pb)
                 + Part(vector=inner * kern + (inner if cfg.mamba_conv_bias else 0) + inner * st + inner + r + 2 * st))
        attn = linear(h, nq * hd) + linear(h, nkv * hd) * 2 + linear(nq * hd, h)
        moe = tuple(i for i, n in enumerate(cfg.layers_num_experts) if n > 1)
        other = {
            "embeddings": Part(cfg.vocab_size * h),
            "lm_head": lm_head(cfg, h),
            "attention": attn * len(attn_ids),
            "mamba": mamba * (n_layers - len(attn_ids)),
            "norms": Part(vector=h) * (2 * n_layers + 1),
            "dense_mlp": glu_mlp(h, cfg.intermediate_size) * (n_layers - len(moe)),
        }
        return ModelParams(
            model_type=cfg.model_type, num_layers=n_layers, moe_layers=moe, num_experts=cls.config_num_experts(cfg),
            top_k=cfg.num_experts_per_tok, expert=Part(3 * h * cfg.intermediate_size), router_row=Part(h),
            other=other,
            kv_per_token=tuple(2 * nkv * hd if i in attn_ids else 0 for i in range(n_layers)),
            window=(None,) * n_layers,
            # mamba layers keep a fixed-size state per sequence instead: conv [inner, kernel], ssm [inner, state]
            state_per_seq=(n_layers - len(attn_ids)) * inner * (kern + st),
        )

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = softmax_topk(logits, layer.top_k, renormalize=False)
        return weights.to(logits.dtype), index
