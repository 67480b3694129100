"""Random gpt-oss checkpoints with the real file layout: config, tensor names, shapes, dtypes, MXFP4.

``write_gpt_oss(folder, scale="20b")`` writes a 12.8 GiB stand-in for openai/gpt-oss-20b (same
config.json, same tensor names, uint8 MXFP4 experts, bf16 everything else) for memory and speed
benchmarks; ``scale="tiny"`` writes the same layout at toy size for tests. Values are random: the
files exercise loading, streaming and pruning, never model quality.

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
from uspx.engine.checkpoint import TensorSpec, make_readable, write_sharded

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
        row_bytes = row_elems * torch.empty((), dtype=spec.dtype).element_size()
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
    elif "router.weight" in name:
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
    out_dir = Path(out_dir)
    cfg = gpt_oss_config(scale, **overrides)
    specs = tensor_specs(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sharded(out_dir, specs, random_producer(cfg, seed), max_shard_bytes, progress)
    write_json(out_dir / "config.json", cfg)
    make_readable(out_dir / "config.json")
    return out_dir


def checkpoint_bytes(cfg: dict) -> int:
    """Bytes of tensor data a gpt-oss MXFP4 checkpoint of this config holds (headers excluded)."""
    return sum(s.nbytes for s in tensor_specs(cfg))
