"""Memory planner: parameters, weight bytes per precision and KV cache, from a config alone.

The user's first question ("does gpt-oss-20b fit my 8 GiB GPU, and with how many experts?") comes
before any download, so everything here reads only the config (a transformers ``PretrainedConfig``,
a ``config.json`` dict, or a path to one) and never touches weights. Each family's parameter formula
is a few lines that mirror its transformers modeling file; the tests check them against
``sum(p.numel())`` of real tiny models, an independent count.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from uspx.io import UspxError, read_json

# Bytes per KV-cache element. fp8/int8 caches halve a 16-bit one; int4 halves again (seed 000 s13).
KV_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
DTYPES = ("fp32", "bf16", "fp16", "int8", "int4", "mxfp4")
MXFP4_BITS = 4.25  # 32 FP4 values (16 bytes) share one 8-bit scale: 17 bytes per 32 weights
GIB = 1 << 30


# ----- parameter counts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A parameter count split by what quantized formats do with it."""

    matrix: int = 0  # 2-D weight matrices: what int8 / int4 / mxfp4 quantize
    vector: int = 0  # biases, norm scales, attention sinks: kept at 16 bits by every quantized format

    @property
    def total(self) -> int:
        return self.matrix + self.vector

    def __add__(self, other: "Part") -> "Part":
        return Part(self.matrix + other.matrix, self.vector + other.vector)

    def __mul__(self, n: int) -> "Part":
        return Part(self.matrix * n, self.vector * n)

    __rmul__ = __mul__


def _linear(n_in: int, n_out: int, bias: bool = False) -> Part:
    return Part(n_in * n_out, n_out if bias else 0)


def _glu_mlp(hidden: int, inter: int) -> Part:
    """gate, up and down projections without biases (every dense / shared MLP here)."""
    return Part(3 * hidden * inter)


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of one model, routed experts apart from everything else."""

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert: Part  # one routed expert: its weight matrices and biases
    router_row: Part  # the router's share of one expert (a weight row, a bias); pruned with the expert
    other: Mapping[str, Part]  # the rest, summed over the model, by component (routers not included)
    kv_per_token: tuple[int, ...]  # K+V elements cached per token, per layer
    window: tuple[int | None, ...]  # sliding window per layer; None = full attention
    state_per_seq: int = 0  # cache elements per sequence that do not grow with context (mamba)
    notes: tuple[str, ...] = ()

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        return self.expert.total * self.num_experts * self.num_moe_layers

    @property
    def router_params(self) -> int:
        return self.router_row.total * self.num_experts * self.num_moe_layers

    @property
    def other_params(self) -> int:
        """Everything but routed experts; routers count here, as the public figures do."""
        return sum(p.total for p in self.other.values()) + self.router_params

    @property
    def total_params(self) -> int:
        return self.expert_params + self.other_params

    def components(self) -> dict[str, int]:
        out = {name: p.total for name, p in self.other.items() if p.total}
        out["routers"] = self.router_params
        out["routed_experts"] = self.expert_params
        return out


@dataclass(frozen=True)
class _Family:
    """Config fields that differ between families sharing the llama-style decoder layer."""

    experts_field: str = "num_local_experts"
    expert_inter: str = "intermediate_size"
    qkv_bias: str | None = None  # config field switching q/k/v biases on
    o_bias: str | None = None
    qk_norm: str | None = None  # "head": per-head RMSNorm (qwen3); "olmoe": full-width q/k norms
    sinks: bool = False
    norm_bias: bool = False  # nn.LayerNorm (phimoe) rather than RMSNorm
    router_bias: bool = False
    expert_bias: bool = False
    shared_expert: str | None = None  # config field with the shared expert's width
    lm_head_bias: str | None = None
    sparse_step: bool = False  # qwen: mlp_only_layers / decoder_sparse_step pick the MoE layers


_LLAMA_LIKE: dict[str, _Family] = {
    "gpt_oss": _Family(qkv_bias="attention_bias", o_bias="attention_bias", sinks=True,
                       router_bias=True, expert_bias=True),
    "mixtral": _Family(),
    "qwen2_moe": _Family(experts_field="num_experts", expert_inter="moe_intermediate_size",
                         qkv_bias="qkv_bias", shared_expert="shared_expert_intermediate_size",
                         sparse_step=True),
    "qwen3_moe": _Family(experts_field="num_experts", expert_inter="moe_intermediate_size",
                         qkv_bias="attention_bias", o_bias="attention_bias", qk_norm="head",
                         sparse_step=True),
    "olmoe": _Family(experts_field="num_experts", qkv_bias="attention_bias",
                     o_bias="attention_bias", qk_norm="olmoe"),
    "phimoe": _Family(qkv_bias="attention_bias", o_bias="attention_bias", norm_bias=True,
                      lm_head_bias="lm_head_bias"),
    "granitemoe": _Family(qkv_bias="attention_bias", o_bias="attention_bias"),
}


def _flag(cfg: Any, name: str | None) -> bool:
    return bool(name and getattr(cfg, name, False))


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _windows(cfg: Any) -> tuple[int | None, ...]:
    """Sliding window per layer: ``layer_types`` when the config has them (gpt_oss, qwen2), else
    ``sliding_window`` on every layer (mistral-style), else full attention everywhere."""
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n


def _moe_layer_ids(cfg: Any, fam: _Family) -> tuple[int, ...]:
    n = cfg.num_hidden_layers
    if not fam.sparse_step:
        return tuple(range(n))
    dense, step = set(getattr(cfg, "mlp_only_layers", None) or []), cfg.decoder_sparse_step
    return tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)


def _llama_like(cfg: Any, fam: _Family) -> ModelParams:
    h, hd, nq, nkv = cfg.hidden_size, _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    n_layers, n_exp = cfg.num_hidden_layers, int(getattr(cfg, fam.experts_field))
    qkv_b, o_b = _flag(cfg, fam.qkv_bias), _flag(cfg, fam.o_bias)
    attn = (_linear(h, nq * hd, qkv_b) + _linear(h, nkv * hd, qkv_b) * 2 + _linear(nq * hd, h, o_b))
    if fam.qk_norm == "head":
        attn += Part(vector=2 * hd)
    elif fam.qk_norm == "olmoe":  # olmoe normalises the whole q and k projections
        attn += Part(vector=h + (h // nq) * nkv)
    if fam.sinks:
        attn += Part(vector=nq)
    norm = Part(vector=2 * h if fam.norm_bias else h)

    moe = _moe_layer_ids(cfg, fam)
    inter = getattr(cfg, fam.expert_inter)
    # gpt_oss: gate_up [H, 2I] + bias [2I], down [I, H] + bias [H]; the others: the same without biases
    expert = Part(3 * h * inter, (2 * inter + h) if fam.expert_bias else 0)
    other: dict[str, Part] = {
        "embeddings": Part(cfg.vocab_size * h),
        "lm_head": Part() if cfg.tie_word_embeddings
        else _linear(h, cfg.vocab_size, _flag(cfg, fam.lm_head_bias)),
        "attention": attn * n_layers,
        "norms": norm * (2 * n_layers + 1),
        "dense_mlp": _glu_mlp(h, cfg.intermediate_size) * (n_layers - len(moe)),
    }
    if fam.shared_expert:  # qwen2_moe: a shared MLP and its sigmoid gate (a [1, H] linear)
        other["shared_experts"] = (_glu_mlp(h, getattr(cfg, fam.shared_expert)) + Part(h)) * len(moe)
    return ModelParams(
        model_type=cfg.model_type, num_layers=n_layers, moe_layers=moe, num_experts=n_exp,
        top_k=cfg.num_experts_per_tok, expert=expert,
        router_row=Part(h, 1 if fam.router_bias else 0), other=other,
        kv_per_token=(2 * nkv * hd,) * n_layers, window=_windows(cfg),
    )


def _deepseek_v3(cfg: Any) -> ModelParams:
    """MLA attention, shared experts, first ``first_k_dense_replace`` layers dense."""
    h, nh, n_layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    kv_rank, rope, b = cfg.kv_lora_rank, cfg.qk_rope_head_dim, bool(cfg.attention_bias)
    if cfg.q_lora_rank is None:
        attn = _linear(h, nh * qk)
    else:
        attn = _linear(h, cfg.q_lora_rank, b) + Part(vector=cfg.q_lora_rank) + _linear(cfg.q_lora_rank, nh * qk)
    attn += _linear(h, kv_rank + rope, b) + Part(vector=kv_rank)
    attn += _linear(kv_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)) + _linear(nh * cfg.v_head_dim, h, b)
    moe = tuple(range(cfg.first_k_dense_replace, n_layers))
    inter = cfg.moe_intermediate_size
    other = {
        "embeddings": Part(cfg.vocab_size * h),
        "lm_head": Part() if cfg.tie_word_embeddings else _linear(h, cfg.vocab_size),
        "attention": attn * n_layers,
        "norms": Part(vector=h) * (2 * n_layers + 1),
        "dense_mlp": _glu_mlp(h, cfg.intermediate_size) * (n_layers - len(moe)),
        "shared_experts": _glu_mlp(h, inter * cfg.n_shared_experts) * len(moe),
    }
    return ModelParams(
        model_type=cfg.model_type, num_layers=n_layers, moe_layers=moe,
        num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
        expert=Part(3 * h * inter),
        # e_score_correction_bias is a buffer, not a parameter, but it is in the checkpoint
        router_row=Part(h, 1), other=other,
        # transformers caches the compressed latent, not per-head K and V
        kv_per_token=(kv_rank + rope,) * n_layers, window=(None,) * n_layers,
        notes=("multi-token-prediction layers of the released checkpoint are not counted "
               "(transformers does not build them)",),
    )


def _dbrx(cfg: Any) -> ModelParams:
    """Fused Wqkv, bias-free LayerNorms, experts flattened to [E*F, H] (w1, v1, w2)."""
    h, n_layers, ffn, attn_cfg = cfg.d_model, cfg.n_layers, cfg.ffn_config, cfg.attn_config
    hd, nkv = h // cfg.n_heads, attn_cfg.kv_n_heads
    other = {
        "embeddings": Part(cfg.vocab_size * h),
        "lm_head": _linear(h, cfg.vocab_size),  # dbrx refuses tied embeddings
        "attention": (_linear(h, h + 2 * nkv * hd) + _linear(h, h)) * n_layers,
        "norms": Part(vector=h) * (2 * n_layers + 1),
    }
    return ModelParams(
        model_type=cfg.model_type, num_layers=n_layers, moe_layers=tuple(range(n_layers)),
        num_experts=ffn.moe_num_experts, top_k=ffn.moe_top_k, expert=Part(3 * h * ffn.ffn_hidden_size),
        router_row=Part(h), other=other, kv_per_token=(2 * nkv * hd,) * n_layers,
        window=(None,) * n_layers,
    )


def _jamba(cfg: Any) -> ModelParams:
    """Mamba layers with attention every ``attn_layer_period``; MoE every ``expert_layer_period``."""
    h, n_layers, r, st = cfg.hidden_size, cfg.num_hidden_layers, cfg.mamba_dt_rank, cfg.mamba_d_state
    inner, kern, pb = cfg.mamba_expand * h, cfg.mamba_d_conv, bool(cfg.mamba_proj_bias)
    hd, nq, nkv = h // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    attn_ids = [i for i, t in enumerate(cfg.layers_block_type) if t == "attention"]
    # conv weights, A_log, D and the three small norms are not Linear layers: no quantizer touches them
    mamba = (_linear(h, 2 * inner, pb) + _linear(inner, r + 2 * st) + _linear(r, inner, True)
             + _linear(inner, h, pb)
             + Part(vector=inner * kern + (inner if cfg.mamba_conv_bias else 0) + inner * st + inner + r + 2 * st))
    attn = _linear(h, nq * hd) + _linear(h, nkv * hd) * 2 + _linear(nq * hd, h)
    moe = tuple(i for i, n in enumerate(cfg.layers_num_experts) if n > 1)
    other = {
        "embeddings": Part(cfg.vocab_size * h),
        "lm_head": Part() if cfg.tie_word_embeddings else _linear(h, cfg.vocab_size),
        "attention": attn * len(attn_ids),
        "mamba": mamba * (n_layers - len(attn_ids)),
        "norms": Part(vector=h) * (2 * n_layers + 1),
        "dense_mlp": _glu_mlp(h, cfg.intermediate_size) * (n_layers - len(moe)),
    }
    return ModelParams(
        model_type=cfg.model_type, num_layers=n_layers, moe_layers=moe, num_experts=cfg.num_experts,
        top_k=cfg.num_experts_per_tok, expert=Part(3 * h * cfg.intermediate_size), router_row=Part(h),
        other=other,
        kv_per_token=tuple(2 * nkv * hd if i in attn_ids else 0 for i in range(n_layers)),
        window=(None,) * n_layers,
        # mamba layers keep a fixed-size state per sequence instead: conv [inner, kernel], ssm [inner, state]
        state_per_seq=(n_layers - len(attn_ids)) * inner * (kern + st),
    )


FAMILIES: dict[str, Callable[[Any], ModelParams]] = {
    **{name: (lambda cfg, fam=fam: _llama_like(cfg, fam)) for name, fam in _LLAMA_LIKE.items()},
    "deepseek_v3": _deepseek_v3,
    "dbrx": _dbrx,
    "jamba": _jamba,
}


def load_config(config: Any) -> Any:
    """A config object with the family's defaults filled in.

    A raw ``config.json`` lacks fields its family defaults (gpt_oss ``layer_types``), so dicts and
    paths go through ``AutoConfig.for_model``; that builds only the config class, no weights.
    """
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        config = read_json(path / "config.json" if path.is_dir() else path)
    if not isinstance(config, Mapping):
        return config
    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise UspxError("config has no model_type; cannot tell the model family")
    if model_type not in FAMILIES:
        raise UspxError(_unsupported(model_type))
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as exc:
        raise UspxError(f"config for {model_type!r} is not valid: {exc}") from None


def _unsupported(model_type: str) -> str:
    return (f"the memory planner has no parameter formula for model type {model_type!r}; "
            f"covered: {', '.join(sorted(FAMILIES))}")


def count_params(config: Any) -> ModelParams:
    """Parameter counts of the model a config describes (config only, no weights)."""
    cfg = load_config(config)
    model_type = getattr(cfg, "model_type", None) or type(cfg).__name__
    if model_type not in FAMILIES:
        raise UspxError(_unsupported(model_type))
    try:
        return FAMILIES[model_type](cfg)
    except AttributeError as exc:
        raise UspxError(f"{model_type} config lacks a field the planner needs: {exc}") from None


# ----- bytes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bits per weight for one storage layout."""

    name: str
    matrix_bits: float  # quantized 2-D matrices
    other_bits: float = 16  # vectors, routers, embeddings and lm_head under quantized formats
    experts_only: bool = False  # mxfp4: only the expert matrices are quantized

    def bits(self, part: Part, quantizable: bool) -> float:
        if not quantizable:
            return self.other_bits * part.total
        return self.matrix_bits * part.matrix + self.other_bits * part.vector


def precision(dtype: str, scale_group: int | None = None) -> Precision:
    """The layout behind a dtype name.

    int8 / int4 follow what transformers' quantizers do: linear layers quantized, embeddings,
    lm_head, routers and vectors left at 16 bits; ``scale_group`` adds one 16-bit scale per that many
    weights (e.g. 32 gives 4.5 bits for int4). ``mxfp4`` is the gpt-oss checkpoint layout: expert
    weight matrices at 4.25 bits, everything else (expert biases and routers too) bf16.
    """
    dtype = dtype.lower()
    if dtype in ("fp32", "float32"):
        return Precision("fp32", 32, 32)
    if dtype in ("bf16", "fp16", "bfloat16", "float16"):
        return Precision(dtype, 16, 16)
    if dtype in ("int8", "int4"):
        if scale_group is not None and scale_group <= 0:
            raise UspxError(f"scale group must be a positive number of weights, got {scale_group}")
        overhead = 16 / scale_group if scale_group else 0.0
        return Precision(dtype, (8 if dtype == "int8" else 4) + overhead)
    if dtype == "mxfp4":
        return Precision("mxfp4", MXFP4_BITS, experts_only=True)
    raise UspxError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _bytes(bits: float) -> int:
    return math.ceil(bits / 8)


def expert_bytes(params: ModelParams, prec: Precision) -> int:
    """Bytes that keeping one expert costs: its tensors plus its router row (pruned with it)."""
    return _bytes(prec.bits(params.expert, True) + prec.bits(params.router_row, False))


def fixed_bytes(params: ModelParams, prec: Precision) -> int:
    """Bytes of everything whose size does not depend on the kept experts."""
    bits = 0.0
    for name, part in params.other.items():
        quantizable = not prec.experts_only and name not in ("embeddings", "lm_head")
        bits += prec.bits(part, quantizable)
    return _bytes(bits)


def kv_cache_bytes(params: ModelParams, context: int, kv_dtype: str = "bf16", batch: int = 1) -> int:
    """K and V for ``context`` tokens; a sliding layer holds at most its window of tokens."""
    if kv_dtype not in KV_BYTES:
        raise UspxError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_BYTES)}")
    if context < 0 or batch < 1:
        raise UspxError(f"context must be >= 0 and batch >= 1 (got {context}, {batch})")
    if context == 0:
        return 0  # no sequence, no cache (mamba state included)
    elems = sum(e * (min(context, w) if w else context) for e, w in zip(params.kv_per_token, params.window))
    return math.ceil((elems + params.state_per_seq) * KV_BYTES[kv_dtype] * batch)


# ----- estimates ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one model at one precision, context and kept-expert count."""

    params: ModelParams
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    experts_per_layer: int
    fixed_bytes: int
    expert_bytes: int  # one expert with its router row
    kv_bytes: int
    reserve_bytes: int = 0  # runtime overhead the user sets aside (CUDA context, activations)

    @property
    def experts_bytes(self) -> int:
        return self.expert_bytes * self.experts_per_layer * self.params.num_moe_layers

    @property
    def weights_bytes(self) -> int:
        return self.fixed_bytes + self.experts_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.reserve_bytes

    def breakdown(self) -> dict[str, Any]:
        p = self.params
        return {
            "model_type": p.model_type,
            "settings": {"dtype": self.dtype, "kv_dtype": self.kv_dtype, "context": self.context,
                         "batch": self.batch, "experts_per_layer": self.experts_per_layer,
                         "num_experts": p.num_experts, "top_k": p.top_k,
                         "moe_layers": p.num_moe_layers},
            "params": {**p.components(), "total": p.total_params,
                       "per_expert": p.expert.total, "active_per_token": self.active_params},
            "bytes": {"fixed_weights": self.fixed_bytes, "per_expert": self.expert_bytes,
                      "kept_experts": self.experts_bytes, "weights": self.weights_bytes,
                      "kv_cache": self.kv_bytes, "reserve": self.reserve_bytes,
                      "total": self.total_bytes},
            "notes": list(p.notes),
        }

    @property
    def active_params(self) -> int:
        """Parameters one token computes with: routed experts only its top-k, and the embedding
        table not at all (a lookup), unless tied to the lm_head. This is how the public 3.6B
        "active" figure of gpt-oss-20b is counted."""
        p = self.params
        lookup = p.other["embeddings"].total if p.other["lm_head"].total else 0
        return p.other_params - lookup + p.expert.total * p.top_k * p.num_moe_layers

    def __rich__(self) -> Any:
        from rich.table import Table

        b = self.breakdown()
        table = Table(title=f"{b['model_type']}: {self.dtype} weights, {self.kv_dtype} KV, "
                            f"{self.context} tokens x {self.batch}, "
                            f"{self.experts_per_layer}/{self.params.num_experts} experts per layer")
        table.add_column("item")
        table.add_column("params", justify="right")
        table.add_column("bytes", justify="right")
        for name, n in b["params"].items():
            table.add_row(name, f"{n:,}", "")
        for name, n in b["bytes"].items():
            table.add_row(name, "", format_bytes(n))
        return table


def estimate(
    config: Any,
    dtype: str = "bf16",
    *,
    context: int = 4096,
    kv_dtype: str = "bf16",
    batch: int = 1,
    experts_per_layer: int | None = None,
    scale_group: int | None = None,
    reserve_bytes: int = 0,
) -> MemoryEstimate:
    """Memory of the model (all experts unless ``experts_per_layer``) at one precision and context."""
    params = config if isinstance(config, ModelParams) else count_params(config)
    prec = precision(dtype, scale_group)
    n = params.num_experts if experts_per_layer is None else int(experts_per_layer)
    if not 0 <= n <= params.num_experts:
        raise UspxError(f"experts per layer must be in 0..{params.num_experts}, got {n}")
    return MemoryEstimate(
        params=params, dtype=prec.name, kv_dtype=kv_dtype, context=context, batch=batch,
        experts_per_layer=n, fixed_bytes=fixed_bytes(params, prec),
        expert_bytes=expert_bytes(params, prec),
        kv_bytes=kv_cache_bytes(params, context, kv_dtype, batch), reserve_bytes=reserve_bytes,
    )


@dataclass(frozen=True)
class ExpertFit:
    """How many experts per layer (same count everywhere) fit a byte budget."""

    budget_bytes: int
    experts_per_layer: int  # the largest uniform count that fits; may be below top_k
    min_budget_bytes: int  # the smallest budget that holds top_k experts per layer
    estimate: MemoryEstimate  # at experts_per_layer, or at top_k when that does not fit

    @property
    def fits(self) -> bool:
        return self.experts_per_layer >= self.estimate.params.top_k

    def message(self) -> str:
        p, e = self.estimate.params, self.estimate
        where = f"{e.dtype} weights, {e.context} tokens of {e.kv_dtype} KV cache x {e.batch}"
        if self.fits:
            return (f"{self.experts_per_layer} of {p.num_experts} experts per layer fit in "
                    f"{format_bytes(self.budget_bytes)} ({where}); predicted {format_bytes(e.total_bytes)}")
        return (f"{format_bytes(self.budget_bytes)} cannot hold top-k = {p.top_k} experts per layer "
                f"({where}); the smallest budget that can is {format_bytes(self.min_budget_bytes)} "
                f"({self.min_budget_bytes} bytes)")

    def require(self) -> "ExpertFit":
        """This fit, or a UspxError naming the smallest budget that works."""
        if not self.fits:
            raise UspxError(self.message())
        return self


def fit_experts(
    config: Any,
    budget_bytes: int | str,
    *,
    context: int = 4096,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    batch: int = 1,
    scale_group: int | None = None,
    reserve_bytes: int = 0,
) -> ExpertFit:
    """Largest n with fixed + n * expert_bytes * L_moe + KV + reserve <= budget (n <= num_experts)."""
    budget = parse_size(budget_bytes)
    base = estimate(config, dtype, context=context, kv_dtype=kv_dtype, batch=batch,
                    experts_per_layer=0, scale_group=scale_group, reserve_bytes=reserve_bytes)
    p = base.params
    per_n = base.expert_bytes * p.num_moe_layers
    room = budget - base.total_bytes
    if room < 0:
        n = 0
    elif per_n == 0:
        n = p.num_experts
    else:
        n = min(p.num_experts, room // per_n)
    k = p.top_k
    shown = estimate(p, dtype, context=context, kv_dtype=kv_dtype, batch=batch,
                     experts_per_layer=max(n, k), scale_group=scale_group, reserve_bytes=reserve_bytes)
    return ExpertFit(budget, n, base.total_bytes + k * per_n, shown)


# ----- sizes as text -------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(size: int | float | str) -> int:
    """Bytes from ``8GiB`` (binary), ``8GB`` (decimal), ``8G`` (binary, as in most tools) or a number."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size < 0:
            raise UspxError(f"a size cannot be negative: {size}")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise UspxError(f"not a size: {size!r} (examples: 8GiB, 7.5GB, 8000MiB, 123456789)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
