"""Parameter counts from a config alone: the types every family's ``count_params`` returns, and the
formula shared by the families built on the llama-style decoder layer.

Each family's ``MoEAdapter.count_params(cfg)`` reads its own config fields and either calls
:func:`decoder_params` with what it read, or writes its whole formula (deepseek_v3, dbrx, jamba).
The formulas mirror the transformers modeling files; tests check them against
``sum(p.numel())`` of real tiny models, an independent count. Nothing here loads weights.

The fields :func:`decoder_params` reads itself are the ones every llama-style config names the same
way (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``num_hidden_layers``, ``intermediate_size``, ``num_experts_per_tok``, ``vocab_size``,
``tie_word_embeddings``, ``sliding_window``, ``layer_types``); anything a family names its own way is
an argument.

:func:`count_params` and :func:`load_config` take a config object, a ``config.json`` dict or a path;
they are the size facts the memory planner and the layer-by-layer peak prediction both read.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from uspx.io import UspxError, read_json

# A config's ``dtype`` (``torch_dtype`` before transformers 5) in the planner's names.
_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


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
    # How the checkpoint the config describes stores its weights, in the planner's dtype names
    # ("mxfp4", "bf16", ...), or a quantization method the planner cannot size; None when the
    # config does not say. Filled by :func:`count_params`, not by the family formulas.
    stored_dtype: str | None = None

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


# ----- shared helpers ------------------------------------------------------------------------------
def linear(n_in: int, n_out: int, bias: bool = False) -> Part:
    """An nn.Linear(n_in, n_out): the matrix, and the bias when there is one."""
    return Part(n_in * n_out, n_out if bias else 0)


def glu_mlp(hidden: int, inter: int) -> Part:
    """gate, up and down projections without biases (every dense / shared MLP here)."""
    return Part(3 * hidden * inter)


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def windows(cfg: Any) -> tuple[int | None, ...]:
    """Sliding window per layer: ``layer_types`` when the config has them, else ``sliding_window``
    on every layer (mistral-style), else full attention everywhere."""
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n


def lm_head(cfg: Any, hidden: int, bias: bool = False) -> Part:
    """The output projection; nothing of its own when tied to the embeddings."""
    return Part() if getattr(cfg, "tie_word_embeddings", False) else linear(hidden, cfg.vocab_size, bias)


def decoder_params(
    cfg: Any,
    *,
    num_experts: int,
    expert_inter: int,
    moe_layers: Sequence[int] | None = None,
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: Literal["head", "full"] | None = None,
    sinks: bool = False,
    norm_bias: bool = False,
    router_bias: bool = False,
    expert_bias: bool = False,
    shared_expert_inter: int | None = None,
    lm_head_bias: bool = False,
) -> ModelParams:
    """Counts of a llama-style decoder whose MLP is a routed-expert block in ``moe_layers``
    (default: every layer) and a dense GLU MLP of ``intermediate_size`` elsewhere.

    ``qk_norm``: "head" is a per-head RMSNorm on q and k, "full" a norm over the whole q and k
    projections. ``sinks``: one learned attention-sink logit per head. ``norm_bias``: LayerNorm (scale
    and bias) instead of RMSNorm. ``expert_bias``: gate_up and down biases in every expert.
    ``shared_expert_inter``: a shared GLU expert of that width with a sigmoid gate (a [1, H] linear)
    in every MoE layer.
    """
    h, hd, nq, nkv = cfg.hidden_size, head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    n_layers = cfg.num_hidden_layers
    attn = linear(h, nq * hd, qkv_bias) + linear(h, nkv * hd, qkv_bias) * 2 + linear(nq * hd, h, o_bias)
    if qk_norm == "head":
        attn += Part(vector=2 * hd)
    elif qk_norm == "full":
        attn += Part(vector=h + (h // nq) * nkv)
    if sinks:
        attn += Part(vector=nq)
    norm = Part(vector=2 * h if norm_bias else h)

    moe = tuple(range(n_layers)) if moe_layers is None else tuple(moe_layers)
    # gate_up [H, 2I] and down [I, H] (+ biases [2I] and [H] when the family has them)
    expert = Part(3 * h * expert_inter, (2 * expert_inter + h) if expert_bias else 0)
    other: dict[str, Part] = {
        "embeddings": Part(cfg.vocab_size * h),
        "lm_head": lm_head(cfg, h, lm_head_bias),
        "attention": attn * n_layers,
        "norms": norm * (2 * n_layers + 1),
        "dense_mlp": glu_mlp(h, cfg.intermediate_size) * (n_layers - len(moe)),
    }
    if shared_expert_inter is not None:
        other["shared_experts"] = (glu_mlp(h, shared_expert_inter) + Part(h)) * len(moe)
    return ModelParams(
        model_type=cfg.model_type, num_layers=n_layers, moe_layers=moe, num_experts=int(num_experts),
        top_k=cfg.num_experts_per_tok, expert=expert, router_row=Part(h, 1 if router_bias else 0),
        other=other, kv_per_token=(2 * nkv * hd,) * n_layers, window=windows(cfg),
    )


# ----- configs and counts --------------------------------------------------------------------------
def _adapter_class(model_type: str) -> Any:
    from uspx.models import adapter_class  # here: uspx.models imports the adapters, which import this module

    return adapter_class(model_type)  # a UspxError naming the type and the supported families


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
    _adapter_class(model_type)
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as exc:
        raise UspxError(f"config for {model_type!r} is not valid: {exc}") from None


def count_params(config: Any) -> ModelParams:
    """Parameter counts of the model a config describes (config only, no weights), from its family's
    adapter, with the precision the config declares for the checkpoint (``stored_dtype``)."""
    cfg = load_config(config)
    model_type = getattr(cfg, "model_type", None) or type(cfg).__name__
    cls = _adapter_class(model_type)
    try:
        params = cls.count_params(cfg)
    except AttributeError as exc:
        raise UspxError(f"{model_type} config lacks a field the planner needs: {exc}") from None
    return dataclasses.replace(params, stored_dtype=declared_dtype(cfg))


def declared_dtype(config: Any) -> str | None:
    """How the config says its checkpoint stores the weights, in the planner's names.

    A ``quantization_config`` wins (``quant_method`` "mxfp4" is the gpt-oss layout; any other method
    is returned as it is named, which :func:`estimate` then refuses to guess at); else the config's
    ``dtype`` / ``torch_dtype``; None when the config says neither.
    """
    get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    quant = get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, Mapping) else getattr(quant, "quant_method", None)
        method = str(getattr(method, "value", method) or "unknown").lower()
        return "mxfp4" if method == "mxfp4" else method
    stored = get("dtype") or get("torch_dtype")
    if stored is None:
        return None
    name = str(stored).removeprefix("torch.").lower()
    return _TORCH_DTYPES.get(name, name)


__all__ = ["ModelParams", "Part", "count_params", "declared_dtype", "decoder_params", "glu_mlp", "head_dim",
           "linear", "lm_head", "load_config", "windows"]
