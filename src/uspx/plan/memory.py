"""Memory planner: parameters, weight bytes per precision and KV cache, from a config alone.

The user's first question ("does gpt-oss-20b fit my 8 GiB GPU, and with how many experts?") comes
before any download, so everything here reads only the config (a transformers ``PretrainedConfig``,
a ``config.json`` dict, or a path to one) and never touches weights. The parameter formulas are
family facts, so they live with each family's adapter (``adapter_class(model_type).count_params``,
see ``uspx.models.params``); this module turns their counts into bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from uspx.io import UspxError
from uspx.models import adapter_class
# count_params, declared_dtype and load_config are the planner's API too (uspx.plan.count_params)
from uspx.models.params import ModelParams, Part, count_params, declared_dtype, load_config  # noqa: F401

# Bytes per KV-cache element: an fp8/int8 cache holds one byte per element, half a 16-bit one; an
# int4 cache half a byte.
KV_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
DTYPES = ("fp32", "bf16", "fp16", "int8", "int4", "mxfp4")
MXFP4_BITS = 4.25  # 32 FP4 values (16 bytes) share one 8-bit scale: 17 bytes per 32 weights
GIB = 1 << 30

# ggml's storage types as llama.cpp's GGUF files hold them: (weights per block, bytes per block), the
# block structs of ggml's ggml-common.h (``sizeof(block_q4_K)`` ...) and the type traits of ggml.c.
# A row of n weights takes n / block * bytes; a row must be whole blocks.
GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "MXFP4": (32, 17), "IQ4_NL": (32, 18),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110),
    "IQ4_XS": (256, 136), "IQ1_S": (256, 50), "IQ1_M": (256, 56), "TQ1_0": (256, 54), "TQ2_0": (256, 66),
}

# llama-quantize's file types (its command-line names) and the ggml type each quantizes weight
# matrices to by default (llama.cpp's src/llama-quant.cpp, llama_ftype_get_default_type). The _S / _M
# / _L mixes then give some tensors another type (the output matrix, a share of the down projections).
GGUF_QUANTS: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
    "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS",
    "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
    "MXFP4_MOE": "MXFP4",
}


def ggml_bits(type_name: str) -> float:
    """Bits per weight of one ggml storage type (``Q4_K``: 144 bytes per 256 weights, 4.5 bits)."""
    key = type_name.upper()
    if key not in GGML_TYPES:
        raise UspxError(f"unknown ggml type {type_name!r}; known: {', '.join(GGML_TYPES)}")
    block, size = GGML_TYPES[key]
    return 8 * size / block


def ggml_row_bytes(type_name: str, n: int) -> int:
    """Bytes of a row of ``n`` weights in ``type_name``; a row must be whole blocks."""
    block, size = GGML_TYPES[type_name.upper()]
    if n % block:
        raise UspxError(f"a {type_name} row holds whole blocks of {block} weights; {n} is not a multiple")
    return n // block * size


def more_bits_layers(n_layers: int) -> int:
    """How many of ``n_layers`` layers llama.cpp's *_M mixes give more bits (``use_more_bits`` in
    src/llama-quant.cpp: the first and last eighth, and every third layer between)."""
    return sum(i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2
               for i in range(n_layers))


def _resolve_dtype(params: ModelParams, dtype: str | None) -> str:
    """``dtype``, or when None the checkpoint's declared precision (bf16 when it declares none)."""
    if dtype is not None:
        return dtype
    stored = params.stored_dtype or "bf16"
    if stored not in DTYPES:
        raise UspxError(
            f"the {params.model_type} config declares its weights as {stored!r}, which the planner "
            f"cannot size; give the precision to plan for ({', '.join(DTYPES)})"
        )
    return stored


# ----- bytes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bits per weight for one storage layout."""

    name: str
    matrix_bits: float  # quantized 2-D matrices
    other_bits: float = 16  # vectors, routers, embeddings and lm_head under quantized formats
    experts_only: bool = False  # mxfp4: only the expert matrices are quantized
    expert_bits: float | None = None  # GGUF *_M mixes: the experts' average (some down projections get more)
    embedding_bits: float | None = None  # GGUF: the token embedding table is quantized too
    lm_head_bits: float | None = None  # GGUF: the output matrix (Q6_K under the K mixes)
    extra_bits: float = 0.0  # GGUF *_M mixes: attention V of some layers in Q6_K, beyond the base type

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
    if dtype.upper() in GGUF_QUANTS and dtype not in ("f32", "f16", "bf16"):
        return gguf_precision(dtype)
    raise UspxError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(DTYPES)} or a GGUF quantization "
                    f"({', '.join(GGUF_QUANTS)})")


# llama-quantize's fallback when a row is not whole blocks of the wanted type (tensor_type_fallback
# in src/llama-quant.cpp): a 32-block type of at least as many bits; F16 when even that does not fit
GGUF_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                 "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
                 "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ4_XS": "IQ4_NL", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}


def gguf_row_type(type_name: str, row: int | None) -> str:
    """The type llama-quantize stores a tensor of rows of ``row`` weights in when asked for
    ``type_name`` (None: rows assumed whole blocks)."""
    if row is None or row % GGML_TYPES[type_name][0] == 0:
        return type_name
    fallback = GGUF_FALLBACK.get(type_name, type_name)
    return fallback if row % GGML_TYPES[fallback][0] == 0 else "F16"


def gguf_precision(quant: str, n_layers: int | None = None, *, hidden: int | None = None,
                   width: int | None = None, v_weights: int = 0, k_weights: int = 0, o_weights: int = 0,
                   n_experts: int | None = None) -> Precision:
    """The layout of a GGUF file quantized by llama-quantize to ``quant`` (``Q4_K_M``, ``Q8_0``, ...):
    weight matrices and the token embeddings at the quantization's type, the output matrix Q6_K under
    the K-quant and IQ mixes (Q8_0 under Q8_0, and where its rows are not whole blocks), norms and
    biases F32 (llama.cpp never quantizes a vector). Under *_M mixes the down projections of
    :func:`more_bits_layers` layers are Q6_K: with ``n_layers`` the experts' bits are that average
    (down is one of an expert's three matrices). With the row lengths (``hidden``: the model's
    width, the rows of gate, up, attention and embeddings; ``width``: an expert's, the rows of its
    down projection) a row that is not whole blocks takes llama-quantize's fallback type. ``v_weights``: the weights of one
    layer's attention V projection, which *_M mixes also store Q6_K in those layers. A model of
    exactly 8 experts (``n_experts``) gets llama.cpp's Mixtral rule: attention K and V (``k_weights``,
    ``v_weights`` per layer) Q8_0, and under the 3- and 4-bit mixes the attention output
    (``o_weights``) Q5_K."""
    key = quant.upper()
    if key not in GGUF_QUANTS:
        raise UspxError(f"unknown GGUF quantization {quant!r}; known: {', '.join(GGUF_QUANTS)}")
    base_type = GGUF_QUANTS[key]
    base = ggml_bits(gguf_row_type(base_type, hidden))
    if key == "MXFP4_MOE":  # experts MXFP4, every other matrix Q8_0
        return Precision(key.lower(), ggml_bits("Q8_0"), 32, expert_bits=ggml_bits("MXFP4"),
                         embedding_bits=ggml_bits("Q8_0"), lm_head_bits=ggml_bits("Q8_0"))
    if key == "Q8_0" or ggml_bits(base_type) >= ggml_bits("Q6_K"):
        out = base
    else:
        out = ggml_bits("Q6_K" if hidden is None or hidden % 256 == 0 else "Q8_0")
    down = ggml_bits(gguf_row_type(base_type, width))
    if key in ("Q4_K_M", "Q5_K_M") and n_layers:
        share = more_bits_layers(n_layers) / n_layers
        down = share * ggml_bits(gguf_row_type("Q6_K", width)) + (1 - share) * down
    expert = base * 2 / 3 + down / 3
    extra = 0.0
    if n_experts == 8 and n_layers and not key.startswith(("IQ1", "IQ2")):
        extra = n_layers * (v_weights + k_weights) * (ggml_bits(gguf_row_type("Q8_0", hidden)) - base)
        if key in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M",
                   "IQ4_XS"):
            extra += n_layers * o_weights * (ggml_bits("Q5_K") - base)
    elif key in ("Q4_K_M", "Q5_K_M") and n_layers:
        extra = more_bits_layers(n_layers) * v_weights * (ggml_bits(gguf_row_type("Q6_K", hidden)) - base)
    return Precision(key.lower(), base, 32, expert_bits=expert, embedding_bits=base, lm_head_bits=out,
                     extra_bits=extra)


def _bytes(bits: float) -> int:
    return math.ceil(bits / 8)


def expert_bytes(params: ModelParams, prec: Precision) -> int:
    """Bytes that keeping one expert costs: its tensors plus its router row (pruned with it)."""
    matrix = prec.expert_bits if prec.expert_bits is not None else prec.matrix_bits
    expert = matrix * params.expert.matrix + prec.other_bits * params.expert.vector
    return _bytes(expert + prec.bits(params.router_row, False))


def fixed_bytes(params: ModelParams, prec: Precision) -> int:
    """Bytes of everything whose size does not depend on the kept experts."""
    bits = prec.extra_bits
    tied = not params.other["lm_head"].total  # llama.cpp then stores the table in the output's type
    for name, part in params.other.items():
        special = {"embeddings": prec.lm_head_bits if tied else prec.embedding_bits,
                   "lm_head": prec.lm_head_bits}.get(name)
        if special is not None:  # GGUF quantizes the embedding table and the output matrix too
            bits += special * part.matrix + prec.other_bits * part.vector
            continue
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
    precision: Precision | None = None  # the layout the bytes were counted in

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
    dtype: str | None = None,
    *,
    context: int = 4096,
    kv_dtype: str = "bf16",
    batch: int = 1,
    experts_per_layer: int | None = None,
    scale_group: int | None = None,
    reserve_bytes: int = 0,
) -> MemoryEstimate:
    """Memory of the model (all experts unless ``experts_per_layer``) at one precision and context.

    ``dtype`` None plans at the precision the config declares for its checkpoint (its
    ``quantization_config``, else its ``dtype``; bf16 when it declares neither).
    """
    params = config if isinstance(config, ModelParams) else count_params(config)
    resolved = _resolve_dtype(params, dtype)
    n = params.num_experts if experts_per_layer is None else int(experts_per_layer)
    if resolved.upper() in GGUF_QUANTS and resolved.upper() not in ("F32", "F16", "BF16"):
        prec = gguf_precision(resolved, params.num_layers, n_experts=n, **_row_lengths(config, params))
    else:
        prec = precision(resolved, scale_group)
    if not 0 <= n <= params.num_experts:
        raise UspxError(f"experts per layer must be in 0..{params.num_experts}, got {n}")
    return MemoryEstimate(
        params=params, dtype=prec.name, kv_dtype=kv_dtype, context=context, batch=batch,
        experts_per_layer=n, fixed_bytes=fixed_bytes(params, prec),
        expert_bytes=expert_bytes(params, prec),
        kv_bytes=kv_cache_bytes(params, context, kv_dtype, batch), reserve_bytes=reserve_bytes, precision=prec,
    )


def _row_lengths(config: Any, params: ModelParams) -> dict[str, int | None]:
    """The model's width, an expert's width and one layer's attention K, V and output weights, from
    a config (whose counts are ``params``), for llama-quantize's rules (:func:`gguf_precision`);
    nothing where only parameter counts were given."""
    if isinstance(config, ModelParams):
        return {}
    cfg = load_config(config)
    family = adapter_class(str(cfg.model_type))
    vocab = getattr(cfg, "vocab_size", None)
    # the model's width as the family's own formula counts it: the embedding table is vocab x width
    hidden = params.other["embeddings"].matrix // int(vocab) if vocab else None
    try:  # families whose config declares no expert width or head layout: rows assumed whole blocks
        width = family.config_expert_width(cfg)
        heads, kv_heads, head_dim = family.config_head_shape(cfg)
    except Exception:
        return dict(hidden=hidden, width=None)
    kv = int(hidden * kv_heads * head_dim) if hidden else 0
    return dict(hidden=hidden, width=width, v_weights=kv, k_weights=kv, o_weights=int(heads * head_dim * (hidden or 0)))


def student_estimate(config: Any, experts_per_layer: int, dtype: str | None = None, *, context: int = 4096,
                     kv_dtype: str = "bf16", batch: int = 1) -> dict[str, Any]:
    """Memory of a dense student whose every MoE layer is one MLP of ``experts_per_layer`` experts
    (``uspx student``), beside the pruned MoE that keeps the same experts.

    Both hold the same expert weights; the student's router is one row per layer instead of one per
    kept expert, and the KV cache is the same (attention is the original's). What differs is the
    compute per token: the student runs all ``M`` experts' channels, the MoE its top-k.
    """
    cfg = load_config(config)
    moe = estimate(cfg, dtype, context=context, kv_dtype=kv_dtype, batch=batch, experts_per_layer=experts_per_layer)
    family = adapter_class(str(cfg.model_type))
    m = int(experts_per_layer)
    # the student's own config (one expert of M experts' width, top-1), sized by the family's formula
    dense = estimate(family.student_config(cfg, m * family.config_expert_width(cfg)), moe.dtype, context=context,
                     kv_dtype=kv_dtype, batch=batch)

    def row(e: MemoryEstimate, active: int | None) -> dict:
        return dict(weights_bytes=e.weights_bytes, kv_bytes=e.kv_bytes, total_bytes=e.weights_bytes + e.kv_bytes,
                    active_params_per_token=active)

    return dict(experts_per_layer=m, dtype=moe.dtype, kv_dtype=kv_dtype, context=context, batch=batch,
                pruned_moe=row(moe, moe.active_params if m >= moe.params.top_k else None),
                dense_student=row(dense, dense.active_params),
                note="formula M_w + M_KV; the student keeps the original's attention, so its KV cache is the MoE's")


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
    dtype: str | None = None,
    kv_dtype: str = "bf16",
    batch: int = 1,
    scale_group: int | None = None,
    reserve_bytes: int = 0,
) -> ExpertFit:
    """Largest n with fixed + n * expert_bytes * L_moe + KV + reserve <= budget (n <= num_experts).

    ``dtype`` None: the checkpoint's declared precision, as in :func:`estimate`.
    """
    budget = parse_size(budget_bytes)
    params = config if isinstance(config, ModelParams) else count_params(config)
    dtype = _resolve_dtype(params, dtype)

    def at(n: int) -> MemoryEstimate:  # from ``config`` itself: GGUF types follow its rows' lengths
        return estimate(config, dtype, context=context, kv_dtype=kv_dtype, batch=batch,
                        experts_per_layer=n, scale_group=scale_group, reserve_bytes=reserve_bytes)

    base = at(0)
    per_n = base.expert_bytes * params.num_moe_layers
    room = budget - base.total_bytes
    n = 0 if room < 0 else params.num_experts if per_n == 0 else min(params.num_experts, room // per_n)
    while n > 0 and at(n).total_bytes > budget:  # llama-quantize's choices may change with the count
        n -= 1
    return ExpertFit(budget, n, base.total_bytes + params.top_k * per_n, at(max(n, params.top_k)))


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
