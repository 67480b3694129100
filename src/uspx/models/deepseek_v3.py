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


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    expert_count_field = "n_routed_experts"
    router_expert_params = ("weight", "e_score_correction_bias")

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
