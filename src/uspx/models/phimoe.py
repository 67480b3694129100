"""phimoe: router ``mlp.router`` (an nn.Linear, weight [E, H]) with sparsemixer routing, always top-2;
experts in mixtral layout.

In eval mode sparsemixer is deterministic: the first expert is the arg-max, the second the arg-max
with the first masked out; each weight is a softmax over the candidates whose relative gap to that
step's maximum is at most ``2 * router_jitter_noise``. In training it samples (Gumbel), which no
adapter can reproduce, so :meth:`route` is the eval-mode routing. Banned experts (-inf logits) never
pass the gap test's softmax, and the test is per expert, so restriction equals pruning exactly.
"""

from __future__ import annotations

import torch

from uspx.models.base import MoEAdapter, MoELayer
from uspx.models.params import ModelParams, decoder_params


class PhimoeAdapter(MoEAdapter):
    family = "phimoe"
    model_types = ("phimoe",)
    router_attr = "router"

    @classmethod
    def count_params(cls, cfg) -> ModelParams:
        """q/k/v/o biases follow ``attention_bias``; LayerNorms (scale and bias); an LM-head bias
        when ``lm_head_bias``; experts of width ``intermediate_size``."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.intermediate_size,
                              qkv_bias=bias, o_bias=bias, norm_bias=True,
                              lm_head_bias=bool(getattr(cfg, "lm_head_bias", False)))

    @property
    def top_k(self) -> int:
        return 2  # sparsemixer picks two experts whatever num_experts_per_tok says

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = 2 * float(self.config.router_jitter_noise)
        w1, i1 = _sparsemixer_step(logits, logits, eps)
        w2, i2 = _sparsemixer_step(logits.scatter(-1, i1, float("-inf")), logits, eps)
        return torch.cat((w1, w2), dim=-1), torch.cat((i1, i2), dim=-1)


def _sparsemixer_step(
    candidates: torch.Tensor, scores: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-mode sparsemixer pick: (weight [N, 1], index [N, 1]), as in transformers' ``sparsemixer``."""
    top, index = candidates.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=top)  # the gap is measured on the unmasked scores, as upstream
    far = ((top - scores) / factor) > eps
    probs = torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1)
    return probs.gather(-1, index), index
