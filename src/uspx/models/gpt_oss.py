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
    router_attr = "router"
    router_expert_params = ("weight", "bias")
    pad_mechanism = "router bias set to -inf"
    single_expert_weight_is_one = True  # softmax over the top-k logits: one logit gives 1
    per_head_params = ("sinks",)  # one attention sink logit per query head
    sinks_param = "sinks"
    mxfp4_suffixes = _MXFP4_SUFFIXES
    cuts_on_disk = True

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
        return next((name[: -len(s)] for s in _MXFP4_SUFFIXES if name.endswith(s)), name)

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

    def merged_experts(self, layer: MoELayer, experts, weights) -> dict[str, torch.Tensor]:
        """gpt-oss layout: ``gate_up_proj`` [E, H, 2I] with gate and up interleaved (even, odd
        columns), its bias [E, 2I], ``down_proj`` [E, I, H], its bias [E, H]. The clamped SwiGLU acts
        on each (gate, up) pair alone, so expert blocks concatenate along the columns with the
        interleaving intact; the down biases add up, weighted."""
        x = layer.experts
        ids = torch.tensor(list(experts))
        w = torch.tensor(list(weights), dtype=x.down_proj.dtype)
        gate_up, bias = x.gate_up_proj.detach()[ids], x.gate_up_proj_bias.detach()[ids]  # [M, H, 2I], [M, 2I]
        down, down_bias = x.down_proj.detach()[ids], x.down_proj_bias.detach()[ids]  # [M, I, H], [M, H]
        return {
            "gate_up_proj": gate_up.permute(1, 0, 2).reshape(gate_up.shape[1], -1).unsqueeze(0),
            "gate_up_proj_bias": bias.reshape(1, -1),
            "down_proj": (down * w[:, None, None]).reshape(-1, down.shape[2]).unsqueeze(0),
            "down_proj_bias": (down_bias * w[:, None]).sum(0, keepdim=True),
        }

    def channel_layout(self, layer: MoELayer, width: int) -> dict[str, tuple[int, torch.Tensor]]:
        c = torch.arange(width)
        pairs = torch.stack([2 * c, 2 * c + 1], 1)  # gate and up of channel c, interleaved
        return {"gate_up_proj": (2, pairs), "gate_up_proj_bias": (1, pairs), "down_proj": (1, c[:, None])}

    def expert_intermediate(self, layer: MoELayer, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        x = layer.experts
        return x._apply_gate(hidden @ x.gate_up_proj[expert] + x.gate_up_proj_bias[expert])

    def channel_positions(self, layer: MoELayer, width: int, channels: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
        # gate and up of a channel stay side by side
        return {n: (d, idx[channels].reshape(-1)) for n, (d, idx) in self.channel_layout(layer, width).items()}

    @classmethod
    def stored_channel_index(cls, name: str, channels: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """Stored as the parameters (``gate_up_proj`` [E, H, 2I], its bias [E, 2I], ``down_proj``
        [E, I, H]) or as MXFP4 blocks of rows (``gate_up_proj_blocks`` [E, 2I, H/32, 16], one run of
        blocks per gate or up row; ``down_proj_blocks`` [E, H, I/32, 16], the channels packed 32 to
        a block along dim 2), scales alike without the last dim. Gate and up of channel ``c`` are
        rows ``2c`` and ``2c + 1``; a block of the down projection is kept whole or not at all."""
        pairs = torch.stack([2 * channels, 2 * channels + 1], 1).reshape(-1)
        base = cls.decoded_name(name)
        quantized = base != name
        if base.endswith("gate_up_proj"):
            return (1 if quantized else 2), pairs
        if base.endswith("gate_up_proj_bias"):
            return 1, pairs
        if base.endswith("down_proj"):
            if not quantized:
                return 1, channels
            blocks = channels.div(mxfp4.BLOCK_SIZE, rounding_mode="floor").unique_consecutive()
            if len(blocks) * mxfp4.BLOCK_SIZE != len(channels):
                raise UspxError(f"{name}: MXFP4 keeps whole blocks of {mxfp4.BLOCK_SIZE} channels; "
                                f"{len(channels)} channels do not fill {len(blocks)} blocks")
            return 2, blocks
        return None
