"""gpt_oss: router ``mlp.router`` (weight [E, H], bias [E]); experts ``gate_up_proj`` [E, H, 2I] with
gate/up interleaved, ``down_proj`` [E, I, H], both with biases; top-k on logits, softmax over the k."""

from __future__ import annotations

import torch

from uspx.io import UspxError
from uspx.models import mxfp4
from uspx.models.base import MoEAdapter, MoELayer, topk_softmax


_MXFP4_SUFFIXES = ("_blocks", "_scales")


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    expert_count_field = "num_local_experts"
    router_attr = "router"
    router_expert_params = ("weight", "bias")
    pad_mechanism = "router bias set to -inf"

    @classmethod
    def count_params(cls, cfg):
        """q/k/v/o biases follow ``attention_bias``; one attention-sink logit per head; routers and
        experts carry biases (gate_up [2I], down [H])."""
        from uspx.models.params import decoder_params

        bias = bool(getattr(cfg, "attention_bias", False))
        return decoder_params(cfg, num_experts=cls.config_num_experts(cfg), expert_inter=cfg.intermediate_size,
                              qkv_bias=bias, o_bias=bias, sinks=True, router_bias=True, expert_bias=True)

    @classmethod
    def filler_value(cls, param: str) -> float:
        # router weight 0 and bias -inf: the filler's logit is -inf for every token, so top-k never
        # picks it (every layer keeps >= top-k live experts)
        return float("-inf") if param.endswith("router.bias") else 0.0

    @classmethod
    def decoded_name(cls, name: str) -> str:
        for suffix in _MXFP4_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    @classmethod
    def read_tensors(cls, ckpt, names, dtype: torch.dtype, experts=None) -> dict[str, torch.Tensor]:
        """MXFP4 ``*_blocks`` / ``*_scales`` pairs become the dense parameter transformers builds
        (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``), decoded one expert at a time into
        the preallocated parameter so no second full-size copy exists. With ``experts``, the other
        experts' rows are allocated but never written: a run restricted to ``experts`` never reads
        them (grouped expert kernels skip experts without tokens), so those pages never become
        resident and a restricted layer costs the memory of its kept experts only."""
        state: dict[str, torch.Tensor] = {}
        for name in names:
            if name.endswith("_scales"):
                continue  # consumed with its blocks
            if not name.endswith("_blocks"):
                state[name] = ckpt.get(name)
                continue
            param = name[: -len("_blocks")]
            scales = param + "_scales"
            if scales not in ckpt:
                raise UspxError(f"{ckpt.path}: {name} has no matching {scales}")
            n_e, rows, groups, _ = ckpt.spec(name).shape
            out = torch.empty(n_e, groups * mxfp4.BLOCK_SIZE, rows, dtype=dtype)
            if experts is None:
                mxfp4.decode_into(out, ckpt.get(name), ckpt.get(scales))
            else:
                for e in sorted(int(x) for x in experts):
                    mxfp4.decode_into(out[e : e + 1], ckpt.rows(name, e, e + 1), ckpt.rows(scales, e, e + 1))
            state[param] = out
        return state

    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax(logits, layer.top_k)
