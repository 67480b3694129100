"""deepseek_v3: the first ``first_k_dense_replace`` layers are dense; MoE layers have router ``mlp.gate``
(weight [E, H], buffer ``e_score_correction_bias`` [E]), mixtral-layout experts and a dense
``shared_experts`` MLP (counted in ``other_bytes``).

Routing (fp32): scores = sigmoid(logits); experts are chosen on scores + correction bias, first
``topk_group`` of ``n_group`` groups by the sum of each group's two best, then top-k inside them;
weights are the plain sigmoid scores of the chosen, renormalised if ``norm_topk_prob``, times
``routed_scaling_factor``.

Bans: sigmoid(-inf) = 0 but the bias would still make the expert choosable, so :meth:`route` treats a
-inf logit as banned and masks it out of the choice (the base's ``masked_logits`` is then exact). With
one group, restriction equals physical pruning. With several, the pruned model regroups the kept
experts into ``n_group`` contiguous groups: restriction equals pruning when every original group keeps
the same number of experts, and not otherwise. A token whose chosen groups hold fewer than top-k
allowed experts (possible only under a restriction) chooses among all allowed experts, so a banned
expert is never routed.
"""

from __future__ import annotations

import torch

from uspx.io import UspxError
from uspx.models.base import MoEAdapter, MoELayer
from uspx.models.params import ModelParams, Part, glu_mlp, linear, lm_head


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    expert_count_field = "n_routed_experts"
    router_expert_params = ("weight", "e_score_correction_bias")
    attention_projections = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    expert_width_field = "moe_intermediate_size"  # intermediate_size is the dense layers' width
    heads_prunable = False  # latent attention: every head reads the one compressed K/V
    dense_mlp_paths = (("mlp", "intermediate_size", None),)  # the first_k_dense_replace layers
    expert_width_also_sizes = "shared_experts"  # width moe_intermediate_size * n_shared_experts

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """MLA attention (q through a ``q_lora_rank`` bottleneck unless it is None, k/v through
        ``kv_lora_rank``), ``n_shared_experts`` shared experts fused into one MLP, the first
        ``first_k_dense_replace`` layers dense."""
        h, nh, n_layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        kv_rank, rope, b = cfg.kv_lora_rank, cfg.qk_rope_head_dim, bool(cfg.attention_bias)
        if cfg.q_lora_rank is None:
            attn = linear(h, nh * qk)
        else:
            attn = linear(h, cfg.q_lora_rank, b) + Part(vector=cfg.q_lora_rank) + linear(cfg.q_lora_rank, nh * qk)
        attn += linear(h, kv_rank + rope, b) + Part(vector=kv_rank)
        attn += linear(kv_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)) + linear(nh * cfg.v_head_dim, h, b)
        moe = tuple(range(cfg.first_k_dense_replace, n_layers))
        inter = cfg.moe_intermediate_size
        other = {
            "embeddings": Part(cfg.vocab_size * h),
            "lm_head": lm_head(cfg, h),
            "attention": attn * n_layers,
            "norms": Part(vector=h) * (2 * n_layers + 1),
            "dense_mlp": glu_mlp(h, cfg.intermediate_size) * (n_layers - len(moe)),
            "shared_experts": glu_mlp(h, inter * cfg.n_shared_experts) * len(moe),
        }
        return ModelParams(
            model_type=cfg.model_type, num_layers=n_layers, moe_layers=moe,
            num_experts=cls.config_num_experts(cfg), top_k=cfg.num_experts_per_tok,
            expert=Part(3 * h * inter),
            # e_score_correction_bias is a buffer, not a parameter, but it is in the checkpoint
            router_row=Part(h, 1), other=other,
            # transformers caches the compressed latent, not per-head K and V
            kv_per_token=(kv_rank + rope,) * n_layers, window=(None,) * n_layers,
            notes=("multi-token-prediction layers of the released checkpoint are not counted "
                   "(transformers does not build them)",),
        )

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        logits = logits.float()
        n, e = logits.shape
        scores = logits.sigmoid()
        choice = (scores + layer.router.e_score_correction_bias).masked_fill(logits.isneginf(), float("-inf"))
        group_scores = choice.view(n, cfg.n_group, e // cfg.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
        in_groups = choice.masked_fill(~group_mask.repeat_interleave(e // cfg.n_group, dim=1), float("-inf"))
        short = (in_groups > float("-inf")).sum(dim=-1, keepdim=True) < layer.top_k
        index = torch.topk(torch.where(short, choice, in_groups), k=layer.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, index

    def pruned_config(self, n_kept: int):
        # The router views the experts as n_group equal groups and sums each group's best two.
        g = self.config.n_group
        if n_kept % g or n_kept // g < 2:
            raise UspxError(
                f"deepseek_v3 groups experts into n_group={g} equal groups of at least 2; "
                f"{n_kept} kept experts per layer cannot be grouped that way"
            )
        return super().pruned_config(n_kept)
