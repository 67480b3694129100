"""Random checkpoints with the real file layout: config, tensor names, shapes, dtypes, MXFP4.

``write_gpt_oss(folder, scale="20b")`` writes a 12.8 GiB stand-in for openai/gpt-oss-20b (same
config.json, same tensor names, uint8 MXFP4 experts, bf16 everything else) for memory and speed
benchmarks; ``scale="tiny"`` writes the same layout at toy size for tests.
``write_qwen3_moe(folder, num_layers=4)`` writes Qwen3-30B-A3B's layers at their real shapes (bf16,
one tensor per expert and projection, as the published checkpoints store them), but only
``num_layers`` decoder layers. Values are random: the files exercise loading, streaming and
pruning, never model quality.

Tensor layout (transformers' gpt_oss MXFP4 loader reads exactly these names, see
``Mxfp4HfQuantizer.serialized_names``): per layer ``mlp.experts.gate_up_proj_blocks`` uint8
``[E, 2I, H/32, 16]``, ``gate_up_proj_scales`` uint8 ``[E, 2I, H/32]``, ``down_proj_blocks``
``[E, H, I/32, 16]``, ``down_proj_scales`` ``[E, H, I/32]``, ``gate_up_proj_bias [E, 2I]`` and
``down_proj_bias [E, H]`` in bf16.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from uspx.io import UspxError, write_json
from uspx.models.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, FP4_VALUES, SCALE_BIAS
from uspx.models.tensorfiles import TensorSpec, make_readable, write_sharded

# config.json of openai/gpt-oss-20b as published (transformers 4.55 format; transformers 5 turns
# rope_scaling + rope_theta into rope_parameters on load).
GPT_OSS_20B_CONFIG: dict = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

# Same layout at toy size. Sizes stay multiples of 32 (one MXFP4 block) along H and I, and the
# sliding window is short so that test sequences cross it.
TINY_OVERRIDES: dict = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "head_dim": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "experts_per_token": 2,
    "vocab_size": 256,
    "sliding_window": 8,
    "eos_token_id": 255,
    "pad_token_id": 254,
}

SCALES = {"20b": {}, "tiny": TINY_OVERRIDES}
MAX_SHARD_BYTES = 4 * 2**30  # 4 GiB: four shards for the 20b stand-in
_ROWS_PER_CHUNK_BYTES = 64 * 2**20  # random data is produced and written 64 MiB at a time


def gpt_oss_config(scale: str = "20b", **overrides: object) -> dict:
    """A gpt-oss config.json dict: ``"20b"`` exactly as published, ``"tiny"`` the same at toy size."""
    if scale not in SCALES:
        raise UspxError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    cfg = copy.deepcopy(GPT_OSS_20B_CONFIG)
    cfg.update(copy.deepcopy(SCALES[scale]))
    cfg.update(overrides)
    n = int(cfg["num_hidden_layers"])
    if len(cfg["layer_types"]) != n:
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    for field in ("hidden_size", "intermediate_size"):
        if int(cfg[field]) % BLOCK_SIZE:
            raise UspxError(f"{field} = {cfg[field]} must be a multiple of {BLOCK_SIZE} for MXFP4 experts")
    return cfg


def tensor_specs(cfg: dict) -> list[TensorSpec]:
    """Every tensor of a gpt-oss MXFP4 checkpoint, in file order (embeddings, layers, norm, head)."""
    h, i_sz, e = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_local_experts"])
    heads, kv, hd = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
    v, bf16, u8 = int(cfg["vocab_size"]), torch.bfloat16, torch.uint8
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), bf16)]
    for layer in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{layer}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), bf16),
            TensorSpec(p + "self_attn.q_proj.weight", (heads * hd, h), bf16),
            TensorSpec(p + "self_attn.q_proj.bias", (heads * hd,), bf16),
            TensorSpec(p + "self_attn.k_proj.weight", (kv * hd, h), bf16),
            TensorSpec(p + "self_attn.k_proj.bias", (kv * hd,), bf16),
            TensorSpec(p + "self_attn.v_proj.weight", (kv * hd, h), bf16),
            TensorSpec(p + "self_attn.v_proj.bias", (kv * hd,), bf16),
            TensorSpec(p + "self_attn.o_proj.weight", (h, heads * hd), bf16),
            TensorSpec(p + "self_attn.o_proj.bias", (h,), bf16),
            TensorSpec(p + "self_attn.sinks", (heads,), bf16),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), bf16),
            TensorSpec(p + "mlp.router.weight", (e, h), bf16),
            TensorSpec(p + "mlp.router.bias", (e,), bf16),
            TensorSpec(p + "mlp.experts.gate_up_proj_blocks", (e, 2 * i_sz, h // BLOCK_SIZE, BYTES_PER_BLOCK), u8),
            TensorSpec(p + "mlp.experts.gate_up_proj_scales", (e, 2 * i_sz, h // BLOCK_SIZE), u8),
            TensorSpec(p + "mlp.experts.gate_up_proj_bias", (e, 2 * i_sz), bf16),
            TensorSpec(p + "mlp.experts.down_proj_blocks", (e, h, i_sz // BLOCK_SIZE, BYTES_PER_BLOCK), u8),
            TensorSpec(p + "mlp.experts.down_proj_scales", (e, h, i_sz // BLOCK_SIZE), u8),
            TensorSpec(p + "mlp.experts.down_proj_bias", (e, h), bf16),
        ]
    specs += [TensorSpec("model.norm.weight", (h,), bf16), TensorSpec("lm_head.weight", (v, h), bf16)]
    return specs


def _fp4_rms() -> float:
    """RMS of a uniformly random FP4 code (about 2.93), to pick scales giving a wanted weight std."""
    return math.sqrt(sum(x * x for x in FP4_VALUES) / len(FP4_VALUES))


def random_producer(cfg: dict, seed: int = 0) -> Callable[[TensorSpec], Iterable[torch.Tensor]]:
    """Random contents per tensor, produced in row chunks; each tensor seeded from its name.

    Per-name seeds make the values independent of sharding and chunking. Magnitudes follow the
    model's init (std 0.02 at 20b size, larger at toy size so that the tiny model's routing is
    decisive and its activations are not all near zero): norms near 1, routers larger.
    """
    h = int(cfg["hidden_size"])
    std = 0.02 if h >= 1024 else 0.15
    scale_byte = round(SCALE_BIAS + math.log2(std / _fp4_rms()))  # E8M0 giving weights of about std

    def produce(spec: TensorSpec) -> Iterable[torch.Tensor]:
        gen = torch.Generator().manual_seed(_name_seed(seed, spec.name))
        row_elems = max(1, math.prod(spec.shape[1:]))
        row_bytes = row_elems * spec.dtype.itemsize
        rows_per_chunk = max(1, _ROWS_PER_CHUNK_BYTES // row_bytes)
        n_rows = spec.shape[0]
        for a in range(0, n_rows, rows_per_chunk):
            shape = (min(rows_per_chunk, n_rows - a), *spec.shape[1:])
            yield _random_values(spec.name, shape, gen, std, scale_byte)

    return produce


def _random_values(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float, scale_byte: int) -> torch.Tensor:
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if name.endswith("_scales"):
        return torch.randint(scale_byte - 1, scale_byte + 2, shape, dtype=torch.uint8, generator=gen)
    x = torch.randn(shape, generator=gen)
    if "norm" in name:
        x = 1.0 + 0.1 * x
    elif "router.weight" in name or name.endswith("mlp.gate.weight"):  # gpt_oss / qwen3_moe routers
        x = x * (1.0 if std > 0.05 else 0.1)  # decisive routing: logit gaps well above rounding noise
    elif "sinks" in name:
        x = x * 0.5
    elif name.endswith("bias"):
        x = x * 0.1 * (1.0 if std > 0.05 else 0.2)
    else:
        x = x * std
    return x.to(torch.bfloat16)


def _name_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def write_gpt_oss(out_dir: str | os.PathLike, scale: str = "20b", *, seed: int = 0,
                  max_shard_bytes: int = MAX_SHARD_BYTES, progress: Callable[[str], None] | None = None,
                  **overrides: object) -> Path:
    """Write a random gpt-oss MXFP4 checkpoint (config.json, shards, index) into ``out_dir``.

    Memory stays at one 64 MiB chunk whatever the size. Returns the folder.
    """
    cfg = gpt_oss_config(scale, **overrides)
    return _write_random(Path(out_dir), cfg, tensor_specs(cfg), seed, max_shard_bytes, progress)


def _write_random(out_dir: Path, cfg: dict, specs: list[TensorSpec], seed: int, max_shard_bytes: int,
                  progress: Callable[[str], None] | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sharded(out_dir, specs, random_producer(cfg, seed), max_shard_bytes, progress)
    write_json(out_dir / "config.json", cfg)
    make_readable(out_dir / "config.json")
    return out_dir


def checkpoint_bytes(cfg: dict) -> int:
    """Bytes of tensor data a gpt-oss MXFP4 checkpoint of this config holds (headers excluded)."""
    return sum(s.nbytes for s in tensor_specs(cfg))


# config.json of Qwen/Qwen3-30B-A3B as published (transformers 4.51 format: ``num_experts``, which
# transformers 5 maps to ``num_local_experts``; ``rope_theta`` becomes ``rope_parameters`` on load).
QWEN3_30B_A3B_CONFIG: dict = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The same layout at toy size, for tests.
QWEN3_TINY_OVERRIDES: dict = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "moe_intermediate_size": 16,
    "head_dim": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 128,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "max_position_embeddings": 256,
}

QWEN3_SCALES = {"30b-a3b": {}, "tiny": QWEN3_TINY_OVERRIDES}


def qwen3_moe_config(num_layers: int = 4, scale: str = "30b-a3b", **overrides: object) -> dict:
    """A qwen3_moe config.json dict: Qwen3-30B-A3B's (or its toy-size twin's) with ``num_layers`` layers."""
    if scale not in QWEN3_SCALES:
        raise UspxError(f"unknown scale {scale!r}; choose one of {sorted(QWEN3_SCALES)}")
    if num_layers < 1:
        raise UspxError(f"num_layers must be at least 1, not {num_layers}")
    cfg = copy.deepcopy(QWEN3_30B_A3B_CONFIG)
    cfg.update(copy.deepcopy(QWEN3_SCALES[scale]))
    cfg["num_hidden_layers"] = int(num_layers)
    cfg.update(overrides)
    return cfg


def _qwen3_sparse(cfg: dict, layer: int) -> bool:
    """Whether decoder layer ``layer`` is an MoE layer (transformers' Qwen3MoeDecoderLayer rule)."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return layer not in (cfg.get("mlp_only_layers") or []) and int(cfg["num_experts"]) > 0 and (layer + 1) % step == 0


def qwen3_moe_tensor_specs(cfg: dict) -> list[TensorSpec]:
    """Every tensor of a qwen3_moe checkpoint as the published ones store it, in file order.

    Per expert ``model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`` (transformers
    stacks them into fused parameters on load), router ``mlp.gate.weight``, per-head ``q_norm`` /
    ``k_norm``; a dense ``mlp.{gate,up,down}_proj`` in ``mlp_only_layers``.
    """
    h, moe_i, dense_i = int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"]), int(cfg["intermediate_size"])
    heads, kv, hd = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
    e, v, bias, bf16 = int(cfg["num_experts"]), int(cfg["vocab_size"]), bool(cfg.get("attention_bias")), torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), bf16)]
    for layer in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{layer}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), bf16),
            TensorSpec(p + "self_attn.q_proj.weight", (heads * hd, h), bf16),
            TensorSpec(p + "self_attn.k_proj.weight", (kv * hd, h), bf16),
            TensorSpec(p + "self_attn.v_proj.weight", (kv * hd, h), bf16),
            TensorSpec(p + "self_attn.o_proj.weight", (h, heads * hd), bf16),
            TensorSpec(p + "self_attn.q_norm.weight", (hd,), bf16),
            TensorSpec(p + "self_attn.k_norm.weight", (hd,), bf16),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), bf16),
        ]
        if bias:
            specs += [TensorSpec(p + f"self_attn.{n}_proj.bias", (d,), bf16)
                      for n, d in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd), ("o", h))]
        if _qwen3_sparse(cfg, layer):
            specs.append(TensorSpec(p + "mlp.gate.weight", (e, h), bf16))
            for x in range(e):
                q = f"{p}mlp.experts.{x}."
                specs += [TensorSpec(q + "gate_proj.weight", (moe_i, h), bf16),
                          TensorSpec(q + "up_proj.weight", (moe_i, h), bf16),
                          TensorSpec(q + "down_proj.weight", (h, moe_i), bf16)]
        else:
            specs += [TensorSpec(p + "mlp.gate_proj.weight", (dense_i, h), bf16),
                      TensorSpec(p + "mlp.up_proj.weight", (dense_i, h), bf16),
                      TensorSpec(p + "mlp.down_proj.weight", (h, dense_i), bf16)]
    specs.append(TensorSpec("model.norm.weight", (h,), bf16))
    if not cfg.get("tie_word_embeddings"):
        specs.append(TensorSpec("lm_head.weight", (v, h), bf16))
    return specs


def write_qwen3_moe(out_dir: str | os.PathLike, num_layers: int = 4, *, scale: str = "30b-a3b", seed: int = 0,
                    max_shard_bytes: int = MAX_SHARD_BYTES, progress: Callable[[str], None] | None = None,
                    **overrides: object) -> Path:
    """Write a random bf16 qwen3_moe checkpoint (config.json, shards, index) into ``out_dir``.

    Qwen3-30B-A3B's config and tensor layout with ``num_layers`` decoder layers (about 1.25 GB of
    weights per layer, 1.24 GB of embedding and head); ``scale="tiny"`` is the same at toy size.
    Memory stays at one 64 MiB chunk whatever the size. Returns the folder.
    """
    cfg = qwen3_moe_config(num_layers, scale, **overrides)
    return _write_random(Path(out_dir), cfg, qwen3_moe_tensor_specs(cfg), seed, max_shard_bytes, progress)
