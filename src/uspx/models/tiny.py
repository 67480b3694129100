"""Tiny configs of every supported family: 2 layers, hidden 32, vocabulary 128, 8 experts top-2.

Each sets the family's own config fields (its expert count, widths, head layout, routing options),
so they live with the adapters; ``uspx.testing`` builds random models from them for tests and
benchmarks.
"""

from __future__ import annotations

import copy

from uspx.io import UspxError

# Shared by the llama-like families: 2 layers, hidden 32, 4 heads (2 KV heads), vocab 128.
_COMMON: dict = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

TINY_CONFIGS: dict[str, dict] = {
    "gpt_oss": dict(
        model_type="gpt_oss",
        **_COMMON,
        intermediate_size=16,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "mixtral": dict(
        model_type="mixtral",
        **_COMMON,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    # qwen2_moe: shared expert with its sigmoid gate; norm_topk_prob off (the family default).
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        **_COMMON,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    # qwen3_moe: norm_topk_prob on (as in the released Qwen3 MoE models); layer 0 dense.
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        **_COMMON,
        head_dim=8,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[0],
    ),
    "olmoe": dict(
        model_type="olmoe",
        **_COMMON,
        eos_token_id=1,  # the default (50279) lies outside the tiny vocabulary
        intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    # deepseek_v3: layer 0 dense, layer 1 MoE with a shared expert; 2 groups of 4 experts, one group
    # chosen per token, so grouped top-k changes the routing.
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        **{**_COMMON, "num_key_value_heads": 4},  # MLA: K/V for every head (masked sdpa fails otherwise)
        intermediate_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    ),
    "granitemoe": dict(
        model_type="granitemoe",
        **_COMMON,
        attention_multiplier=0.125,  # 1/head_dim as in released granite MoEs; the default 1.0 is unscaled
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    # phimoe: sparsemixer routing is top-2 by construction. Each weight is a softmax over the experts
    # within 2 * router_jitter_noise (relative) of that pick's maximum; the released 0.01 leaves almost
    # every weight at exactly 1 on random routers, 0.1 makes the gap rule matter.
    "phimoe": dict(
        model_type="phimoe",
        **_COMMON,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_jitter_noise=0.1,
    ),
    "dbrx": dict(
        model_type="dbrx",
        vocab_size=128,
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=256,
        # DbrxAttention reads attn_config.rope_theta (not a declared field) and clamps with clip_qkv,
        # which fails when it is None (the released DBRX uses 8).
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={
            "ffn_hidden_size": 16,
            "moe_num_experts": 8,
            "moe_top_k": 2,
            "moe_normalize_expert_weights": 1.0,
        },
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # jamba: layer 0 mamba with a dense MLP, layer 1 attention with the MoE (expert_layer_offset=1).
    "jamba": dict(
        model_type="jamba",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
    ),
}


def tiny_config_kwargs(family: str) -> dict:
    """A fresh copy of ``family``'s tiny config fields (``model_type`` included)."""
    if family not in TINY_CONFIGS:
        raise UspxError(f"no tiny config for family {family!r}; families: {', '.join(sorted(TINY_CONFIGS))}")
    return copy.deepcopy(TINY_CONFIGS[family])  # nested dicts (rope, dbrx sub-configs) are shared
