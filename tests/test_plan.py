"""Memory planner and selection under a budget."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import random

import pytest

from uspx.io import UspxError
from uspx.plan import memory as mem
from uspx.plan import select as sel
from uspx.plan.select import Item

# gpt-oss-20b: the fields of the released config.json that size it (no quantization_config).
GPT_OSS_20B = dict(
    model_type="gpt_oss", hidden_size=2880, num_hidden_layers=24, num_local_experts=32,
    num_experts_per_tok=4, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
    head_dim=64, sliding_window=128,
    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
    vocab_size=201088, attention_bias=True, tie_word_embeddings=False,
)


def close(a: float, b: float, rel: float = 0.02) -> bool:
    return abs(a - b) <= rel * abs(b)


# ----- memory planner ---------------------------------------------------------------------------
def test_gpt_oss_20b_public_figures():
    p = mem.count_params(GPT_OSS_20B)
    assert close(p.total_params, 20.91e9)
    assert close(p.expert_params, 19.12e9)
    # one expert: gate_up [2880, 5760] + bias 5760, down [2880, 2880] + bias 2880
    assert p.expert.total == 2880 * 5760 + 5760 + 2880 * 2880 + 2880 == 24_891_840
    mx = mem.estimate(p, "mxfp4", context=0)
    assert close(mx.weights_bytes / mem.GIB, 12.8)
    assert close(mx.expert_bytes / 1e6, 13.2)  # one expert about 13.2 MB in MXFP4
    assert close(mem.estimate(p, "bf16", context=0).weights_bytes / mem.GIB, 39.0)
    assert close(mx.active_params, 3.61e9)  # the public "3.6B active"
    # 8 KV heads * 64 * 2 (K, V) * 2 bytes = 2 KiB per token per layer
    assert mem.kv_cache_bytes(p, 1, "bf16") == 2048 * 24
    # only the 12 full-attention layers grow; the 12 sliding ones stop at 128 tokens
    assert mem.kv_cache_bytes(p, 8192) == 2048 * (12 * 8192 + 12 * 128)
    assert mem.kv_cache_bytes(p, 100) == 2048 * 24 * 100


def test_fit_experts_in_8_gib():
    fit = mem.fit_experts(GPT_OSS_20B, "8GiB", context=4096, dtype="mxfp4")
    assert fit.fits and fit.experts_per_layer == 15
    assert fit.estimate.total_bytes <= 8 * mem.GIB
    one_more = mem.estimate(GPT_OSS_20B, "mxfp4", context=4096, experts_per_layer=16)
    assert one_more.total_bytes > 8 * mem.GIB
    assert fit.require() is fit and "15 of 32" in fit.message()

    small = mem.fit_experts(GPT_OSS_20B, "3GiB", context=4096, dtype="mxfp4")
    assert not small.fits
    at_k = mem.estimate(GPT_OSS_20B, "mxfp4", context=4096, experts_per_layer=4)
    assert small.min_budget_bytes == at_k.total_bytes
    with pytest.raises(UspxError, match=str(small.min_budget_bytes)):
        small.require()
    assert mem.fit_experts(GPT_OSS_20B, small.min_budget_bytes, context=4096, dtype="mxfp4").experts_per_layer == 4


def test_fit_experts_sizes_gguf_types_from_the_config():
    """Under a GGUF quantization the kept count is the largest whose estimate of the model (with
    llama-quantize's per-row types, which need the config's row lengths) fits the budget."""
    fit = mem.fit_experts(GPT_OSS_20B, "13GiB", context=0, dtype="q4_k_m")
    n = fit.experts_per_layer
    assert 4 <= n < 32 and fit.estimate.total_bytes <= 13 * mem.GIB
    assert fit.estimate.total_bytes == mem.estimate(GPT_OSS_20B, "q4_k_m", context=0, experts_per_layer=n).total_bytes
    assert mem.estimate(GPT_OSS_20B, "q4_k_m", context=0, experts_per_layer=n + 1).total_bytes > 13 * mem.GIB


def test_select_experts_sizes_gguf_types_from_the_config():
    """The selection under a GGUF quantization sizes the model as the planner does from the config
    (llama-quantize's per-row types): the same fixed bytes, and the count fit_experts finds."""
    import pyarrow as pa

    table = pa.table(dict(layer=[l for l in range(24) for _ in range(32)], expert=list(range(32)) * 24,
                          value=[float(e) for _ in range(24) for e in range(32)]))
    plan = sel.select_experts(table, budget="13GiB", config=GPT_OSS_20B, dtype="q4_k_m", context=0)
    assert plan.sizes["fixed_weights"] == mem.estimate(GPT_OSS_20B, "q4_k_m", context=0, experts_per_layer=0).fixed_bytes
    n = mem.fit_experts(GPT_OSS_20B, "13GiB", context=0, dtype="q4_k_m").experts_per_layer
    assert set(plan.counts.values()) == {n} and plan.kept[0] == list(range(32 - n, 32))


def test_breakdown_and_rich_table():
    from rich.console import Console

    est = mem.estimate(GPT_OSS_20B, "mxfp4", context=4096)
    b = est.breakdown()
    assert b["params"]["total"] == sum(v for k, v in b["params"].items()
                                       if k not in ("total", "per_expert", "active_per_token"))
    assert b["bytes"]["total"] == b["bytes"]["weights"] + b["bytes"]["kv_cache"]
    json.dumps(b)  # plain data, ready for a JSON report
    out = io.StringIO()
    Console(file=out, width=120).print(est)
    assert "routed_experts" in out.getvalue() and "GiB" in out.getvalue()


def test_precisions():
    p = mem.count_params(GPT_OSS_20B)
    bf16, fp32 = mem.estimate(p, "bf16", context=0), mem.estimate(p, "fp32", context=0)
    assert fp32.weights_bytes == 2 * bf16.weights_bytes
    int4, int4_g32 = mem.estimate(p, "int4", context=0), mem.estimate(p, "int4", context=0, scale_group=32)
    assert int4.expert_bytes < int4_g32.expert_bytes < mem.estimate(p, "int8", context=0).expert_bytes
    # int4 with one 16-bit scale per 32 weights is 4.5 bits, mxfp4 4.25: same tensors, ratio 4.5 / 4.25
    mx = mem.estimate(p, "mxfp4", context=0)
    vectors = (p.expert.vector + p.router_row.total) * 2
    assert close((int4_g32.expert_bytes - vectors) / (mx.expert_bytes - vectors), 4.5 / 4.25, 1e-6)
    with pytest.raises(UspxError, match="unknown weight dtype"):
        mem.estimate(p, "fp7")
    with pytest.raises(UspxError, match="KV cache dtype"):
        mem.estimate(p, "bf16", kv_dtype="fp7")


def test_config_inputs_agree(tmp_path):
    from transformers import AutoConfig

    data = dict(GPT_OSS_20B)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_20B))
    totals = {mem.count_params(c).total_params for c in (GPT_OSS_20B, cfg, tmp_path, tmp_path / "config.json")}
    assert len(totals) == 1
    # a raw config.json without layer_types gets the family default (sliding on even layers)
    no_types = {k: v for k, v in GPT_OSS_20B.items() if k != "layer_types"}
    assert mem.count_params(no_types).window == mem.count_params(GPT_OSS_20B).window


def test_unsupported_family_is_named():
    with pytest.raises(UspxError, match="'llama'"):
        mem.count_params({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(UspxError, match="model_type"):
        mem.count_params({"hidden_size": 8})


def test_parameter_formulas_are_the_adapters(monkeypatch):
    """The planner holds no family facts: its counts come from the family's adapter class."""
    import inspect

    from uspx.models import adapter_class
    from uspx.testing import tiny_config

    source = inspect.getsource(mem)
    for field in ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
                  "ffn_config", "mamba_", "decoder_sparse_step", "attention_bias", "qkv_bias",
                  "shared_expert", "layers_block_type", "hidden_size"):
        assert field not in source, field
    for family in _tiny_families():
        cfg = tiny_config(family)
        assert mem.count_params(cfg).total_params == adapter_class(family).count_params(cfg).total_params
    # a changed family formula changes the plan: nothing in the planner shadows it
    cls = adapter_class("mixtral")
    real = cls.count_params
    monkeypatch.setattr(cls, "count_params", classmethod(
        lambda c, cfg: dataclasses.replace(real(cfg), num_experts=3)))
    assert mem.count_params(tiny_config("mixtral")).num_experts == 3


def test_config_only_gpt_oss_20b_is_planned_at_its_stored_mxfp4(tmp_path):
    """The released config says quant_method mxfp4: with no dtype given, plan MXFP4 experts."""
    from typer.testing import CliRunner

    from uspx.cli import app
    from uspx.models.synthetic import GPT_OSS_20B_CONFIG

    assert mem.declared_dtype(GPT_OSS_20B_CONFIG) == "mxfp4"
    assert mem.count_params(GPT_OSS_20B_CONFIG).stored_dtype == "mxfp4"
    fit = mem.fit_experts(GPT_OSS_20B_CONFIG, "8GiB", context=4096)
    assert fit.experts_per_layer == 15 and fit.estimate.dtype == "mxfp4"
    assert mem.estimate(GPT_OSS_20B_CONFIG).weights_bytes == mem.estimate(GPT_OSS_20B, "mxfp4").weights_bytes
    # an explicit dtype still wins (bf16 experts: only 4 fit)
    assert mem.fit_experts(GPT_OSS_20B_CONFIG, "8GiB", context=4096, dtype="bf16").experts_per_layer == 4

    folder = tmp_path / "gpt-oss-20b"  # a config, no weights
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(GPT_OSS_20B_CONFIG))
    res = CliRunner().invoke(app, ["plan", str(folder), "--budget", "8GiB", "--context", "4096",
                                   "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["experts_per_layer_fit"] == 15 and out["settings"]["dtype"] == "mxfp4"
    assert "15 of 32" in res.output.replace("\n", " ")
    res = CliRunner().invoke(app, ["plan", str(folder), "--budget", "8GiB", "--dtype", "bf16",
                                   "-o", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["experts_per_layer_fit"] == 4


def test_declared_dtypes():
    assert mem.declared_dtype({"model_type": "mixtral", "torch_dtype": "bfloat16"}) == "bf16"
    assert mem.declared_dtype({"model_type": "mixtral", "dtype": "float32"}) == "fp32"
    assert mem.declared_dtype({"model_type": "mixtral"}) is None
    assert mem.estimate(GPT_OSS_20B, context=0).dtype == "bf16"  # declares nothing: bf16
    as_fp32 = mem.estimate({**GPT_OSS_20B, "dtype": "float32"}, context=0)
    assert as_fp32.dtype == "fp32" and as_fp32.weights_bytes == mem.estimate(GPT_OSS_20B, "fp32", context=0).weights_bytes
    fp8 = {**GPT_OSS_20B, "quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(UspxError, match="'fp8'"):
        mem.fit_experts(fp8, "8GiB")
    assert mem.fit_experts(fp8, "8GiB", dtype="mxfp4").experts_per_layer == 15


def test_parse_size():
    assert mem.parse_size("8GiB") == mem.parse_size("8G") == 8 << 30
    assert mem.parse_size("7.5GB") == 7_500_000_000
    assert mem.parse_size(123) == 123
    with pytest.raises(UspxError, match="not a size"):
        mem.parse_size("eight gigs")


def _tiny_families() -> list[str]:
    from uspx.testing import TINY_CONFIGS

    return sorted(TINY_CONFIGS)


@pytest.mark.parametrize("family", _tiny_families())
def test_counts_match_real_tiny_models(family):
    """An independent check: the planner's formula against the parameters transformers builds."""
    import torch
    from transformers import AutoModelForCausalLM

    from uspx.testing import tiny_config

    cfg = tiny_config(family)
    try:
        p = mem.count_params(cfg)
    except UspxError as exc:  # a family added to TINY_CONFIGS before the planner knows it
        assert family in str(exc)
        pytest.skip(f"no planner formula for {family}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    params = sum(t.numel() for t in model.parameters())
    # deepseek's e_score_correction_bias is a buffer but ships in the checkpoint: the planner counts it
    params += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert p.total_params == params
    experts = sum(t.numel() for n, t in model.named_parameters() if ".experts." in n)
    assert p.expert_params == experts


@pytest.mark.parametrize(
    "family, changes",
    [
        ("mixtral", dict(tie_word_embeddings=True)),
        ("gpt_oss", dict(attention_bias=False)),
        ("qwen2_moe", dict(qkv_bias=False, mlp_only_layers=[1])),
        ("qwen3_moe", dict(attention_bias=True, mlp_only_layers=[], decoder_sparse_step=2)),
        ("phimoe", dict(attention_bias=True, lm_head_bias=True)),
        ("deepseek_v3", dict(q_lora_rank=None, attention_bias=True)),
    ],
)
def test_counts_match_config_variants(family, changes):
    from transformers import AutoModelForCausalLM

    from uspx.testing import TINY_CONFIGS

    cfg = mem.load_config({**TINY_CONFIGS[family], **changes})
    model = AutoModelForCausalLM.from_config(cfg)
    params = sum(t.numel() for t in model.parameters())
    params += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert mem.count_params(cfg).total_params == params


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "deepseek_v3"])
def test_expert_cost_matches_the_adapter(family):
    """The scorer's cost_bytes come from the adapter: the planner must agree with it (fp32 copy)."""
    from uspx.models import adapter_for
    from uspx.testing import tiny_model

    model = tiny_model(family)
    adapter = adapter_for(model)
    est = mem.estimate(model.config, "fp32", context=0)
    assert adapter.bytes_per_expert(adapter.layers[0]) == est.expert_bytes
    assert adapter.total_bytes() == est.weights_bytes


def test_kv_matches_transformers_cache():
    """Sliding layers: transformers keeps window-1 past tokens, the planner budgets the full window."""
    import torch

    from uspx.testing import tiny_model

    model = tiny_model("gpt_oss")
    p = mem.count_params(model.config)
    with torch.no_grad():
        cache = model(torch.randint(0, 100, (1, 20)), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    planned = mem.kv_cache_bytes(p, 20, "fp32")
    sliding = sum(1 for w in p.window if w)
    assert 0 <= planned - real <= sliding * p.kv_per_token[0] * 4


# ----- solvers ------------------------------------------------------------------------------------
def brute_force(groups, capacity, floor):
    best, best_sel = -float("inf"), None
    per_layer = {
        l: [c for r in range(floor, len(items) + 1) for c in itertools.combinations(items, r)]
        for l, items in groups.items()
    }
    for combo in itertools.product(*per_layer.values()):
        w = sum(it.cost for c in combo for it in c)
        v = sum(it.value for c in combo for it in c)
        if w <= capacity and v > best:
            best, best_sel = v, combo
    return best, best_sel


def value_of(groups, kept):
    vals = {(l, it.expert): it.value for l, items in groups.items() for it in items}
    return sum(vals[l, e] for l, ids in kept.items() for e in ids)


def weight_of(groups, kept):
    costs = {(l, it.expert): it.cost for l, items in groups.items() for it in items}
    return sum(costs[l, e] for l, ids in kept.items() for e in ids)


def items(pairs):
    return [Item(e, v, w) for e, (v, w) in enumerate(pairs)]


def test_hand_instance_where_both_are_optimal():
    # layer 0: (10, 5) (6, 3) (6, 3) (1, 1); layer 1: (4, 2) (3, 2) (1, 1) (0.5, 1); capacity 10, top-1
    # best by hand: layer 0 {0, 1} (16, w 8) + layer 1 {0} (4, w 2) = 20
    groups = {0: items([(10, 5), (6, 3), (6, 3), (1, 1)]), 1: items([(4, 2), (3, 2), (1, 1), (0.5, 1)])}
    assert brute_force(groups, 10, 1)[0] == 20
    assert sel.greedy(groups, 10, 1) == {0: [0, 1], 1: [0]}
    kept, info = sel.lagrangian(groups, 10, 1)
    assert value_of(groups, kept) == 20 and weight_of(groups, kept) <= 10
    assert info["upper_bound"] >= 20


def test_hand_instance_with_an_integrality_gap():
    # layer 0: (3, 1) (8, 4) (1, 4) (1, 4); layer 1: (2, 1) and three (0.1, 4); capacity 5, top-1.
    # Best: layer 0 {1} + layer 1 {0} = 10 (w 5). v/w order takes (3, 1) first and then (8, 4) no
    # longer fits: greedy and the Lagrangian both stop at 5; the dual bound at lambda = 2 is 11.
    groups = {0: items([(3, 1), (8, 4), (1, 4), (1, 4)]), 1: items([(2, 1), (0.1, 4), (0.1, 4), (0.1, 4)])}
    assert brute_force(groups, 5, 1)[0] == 10
    assert value_of(groups, sel.greedy(groups, 5, 1)) == 5
    kept, info = sel.lagrangian(groups, 5, 1)
    assert value_of(groups, kept) == 5
    assert 10 <= info["upper_bound"] <= 11 + 1e-6


def test_top_k_floor_is_kept_even_with_worthless_experts():
    groups = {0: items([(5, 1), (4, 1), (3, 1), (2, 1)]), 1: items([(0, 1), (-1, 1), (0, 1), (-2, 1)])}
    for kept in (sel.greedy(groups, 6, 2), sel.lagrangian(groups, 6, 2)[0]):
        assert len(kept[1]) == 2 and set(kept[1]) == {0, 2}
        assert kept[0] == [0, 1, 2, 3]
    assert sel.greedy(groups, 3, 2) is None and sel.lagrangian(groups, 3, 2)[0] is None


def test_random_instances_against_brute_force():
    rng = random.Random(0)
    for trial in range(40):
        equal_costs = trial % 2 == 0
        groups = {
            l: [Item(e, round(rng.uniform(-1, 10), 2), 3.0 if equal_costs else float(rng.randint(1, 6)))
                for e in range(4)]
            for l in range(2)
        }
        floor = rng.choice([1, 2])
        capacity = rng.uniform(sum(sel._floor_cost(g, floor) for g in groups.values()), 40)
        opt = brute_force(groups, capacity, floor)[0]
        g = sel.greedy(groups, capacity, floor)
        lag, info = sel.lagrangian(groups, capacity, floor)
        for kept in (g, lag):
            assert weight_of(groups, kept) <= capacity + 1e-9
            assert all(len(ids) >= floor for ids in kept.values())
            assert value_of(groups, kept) <= opt + 1e-9
        assert opt <= info["upper_bound"] + 1e-6
        if equal_costs:  # with one cost per expert, v/w order is value order: both are exact
            assert value_of(groups, g) == pytest.approx(opt)
            assert value_of(groups, lag) == pytest.approx(opt)


def test_uniform_counts_take_the_n_best_per_layer():
    groups = {0: items([(1, 2), (9, 2), (5, 2), (7, 2)]), 1: items([(8, 2), (2, 2), (6, 2), (4, 2)])}
    assert sel.uniform_counts(groups, 12, 1) == {0: [1, 2, 3], 1: [0, 2, 3]}
    assert sel.uniform_counts(groups, 11.9, 1) == {0: [1, 3], 1: [0, 2]}
    assert sel.uniform_counts(groups, 3, 2) is None


# ----- select() ---------------------------------------------------------------------------------------
def table(values: dict[int, list[float]], cost: float = 10.0) -> list[dict]:
    return [dict(layer=l, expert=e, value=v, cost_bytes=cost) for l, vs in values.items() for e, v in enumerate(vs)]


TWO_LAYERS = {0: [5, 1, 3, 0.5], 1: [2, 2.5, 9, 1]}


def test_select_refuses_an_unmeetable_budget_with_the_smallest_size():
    # floor: 2 experts x 2 layers x 10 bytes + 5 fixed = 45
    with pytest.raises(UspxError, match=r"smallest size that can is .*\(45 bytes\)"):
        sel.select_experts(table(TWO_LAYERS), budget=44, top_k=2, fixed_bytes=5)
    plan = sel.select_experts(table(TWO_LAYERS), budget=45, top_k=2, fixed_bytes=5)
    assert plan.kept == {0: [0, 2], 1: [1, 2]} and plan.predicted_bytes == 45


def test_select_uniform_default_and_keep():
    plan = sel.select_experts(table(TWO_LAYERS), budget=74, top_k=1, fixed_bytes=5)
    assert plan.uniform and plan.solver["name"] == "uniform" and plan.counts == {0: 3, 1: 3}
    assert plan.kept == {0: [0, 1, 2], 1: [0, 1, 2]} and plan.predicted_bytes == 65
    assert plan.padding is None
    half = sel.select_experts(table(TWO_LAYERS), keep="50%", top_k=2)
    assert half.kept == {0: [0, 2], 1: [1, 2]} and half.keep == "50%"
    assert sel.select_experts(table(TWO_LAYERS), keep=3, top_k=2).counts == {0: 3, 1: 3}
    assert sel.select_experts(table(TWO_LAYERS), keep=0.25, top_k=1).counts == {0: 1, 1: 1}
    with pytest.raises(UspxError, match="fewer than top-k"):
        sel.select_experts(table(TWO_LAYERS), keep="25%", top_k=2)
    with pytest.raises(UspxError, match="keep must be"):
        sel.select_experts(table(TWO_LAYERS), keep="half", top_k=2)
    with pytest.raises(UspxError, match="exactly one"):
        sel.select_experts(table(TWO_LAYERS), top_k=2)


def test_select_non_uniform_and_its_padding_note():
    rows = table({0: [5, 4, 3, 2], 1: [9, 0.1, 0.2, 0.1]})
    for method in sel.METHODS:
        plan = sel.select_experts(rows, budget=60, top_k=1, uniform=False, method=method)
        assert plan.solver["name"] == method and plan.counts == {0: 4, 1: 2}
        assert plan.predicted_bytes == 60 and plan.sizes["padded"] == 80
        assert "pads every layer to 4" in plan.padding and "over the budget" in plan.padding
    with pytest.raises(UspxError, match="unknown selection method"):
        sel.select_experts(rows, budget=60, top_k=1, uniform=False, method="magic")


def test_select_with_the_memory_planner():
    from uspx.testing import TINY_CONFIGS

    cfg = TINY_CONFIGS["gpt_oss"]  # 2 MoE layers x 8 experts, top-2
    rng = random.Random(1)
    rows = [dict(layer=l, expert=e, value=rng.random()) for l in range(2) for e in range(8) if (l, e) != (1, 7)]
    fit = mem.fit_experts(cfg, mem.estimate(cfg, "bf16", context=64, experts_per_layer=5).total_bytes,
                          dtype="bf16", context=64)
    assert fit.experts_per_layer == 5
    plan = sel.select_experts(rows, budget=fit.budget_bytes, config=cfg, context=64,
                      scores_fingerprint="s" * 64, model_fingerprint="m" * 64)
    assert plan.counts == {0: 5, 1: 5} and plan.top_k == 2 and plan.num_experts == 8
    assert plan.predicted_bytes == fit.estimate.total_bytes <= fit.budget_bytes
    for layer in (0, 1):
        ranked = sorted((r for r in rows if r["layer"] == layer), key=lambda r: -r["value"])
        assert plan.kept[layer] == sorted(r["expert"] for r in ranked[:5])
    assert plan.model_type == "gpt_oss" and plan.scores_fingerprint == "s" * 64

    with pytest.raises(UspxError, match="not a MoE layer"):
        sel.select_experts(rows + [dict(layer=5, expert=0, value=1.0)], keep=4, config=cfg)

    # layer 0: every expert worth 1; layer 1: only expert 0. keep=50% of 8 over 2 layers = 8 slots:
    # layer 1 gets its top-2 floor, layer 0 the other 6. Padding is exact for gpt_oss only.
    skewed = [dict(layer=l, expert=e, value=float(l == 0 or e == 0)) for l in range(2) for e in range(8)]
    for family, says in (("gpt_oss", "router bias set to -inf"), ("mixtral", "only for gpt_oss, not mixtral")):
        plan = sel.select_experts(skewed, keep="50%", config=TINY_CONFIGS[family], uniform=False, method="greedy")
        assert plan.counts == {0: 6, 1: 2} and plan.kept[1] == [0, 1]
        assert says in plan.padding


def test_score_tables_from_pandas_and_pyarrow():
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    rows = table(TWO_LAYERS)
    expected = sel.select_experts(rows, budget=65, top_k=1).kept
    assert sel.select_experts(pd.DataFrame(rows), budget=65, top_k=1).kept == expected
    assert sel.select_experts(pa.Table.from_pylist(rows), budget=65, top_k=1).kept == expected
    with pytest.raises(UspxError, match="cost_bytes"):
        sel.select_experts([dict(layer=0, expert=0, value=1.0)], budget=65, top_k=1)
    with pytest.raises(UspxError, match="twice"):
        sel.read_scores(rows + rows[:1])
    with pytest.raises(UspxError, match="nan"):
        sel.read_scores([dict(layer=0, expert=0, value=float("nan"), cost_bytes=1)])


# ----- plan files ---------------------------------------------------------------------------------
def test_plan_json_round_trip(tmp_path):
    plan = sel.select_experts(table({0: [5, 4, 3, 2], 1: [9, 0.1, 0.2, 0.1]}), budget=60, top_k=1, uniform=False,
                      scores_fingerprint="abc", model_fingerprint="def")
    path = tmp_path / "plan.json"
    plan.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # atomic write, no temp files left
    back = sel.load_plan(path)
    assert back.to_dict() == plan.to_dict()
    assert back.kept_set() == {0: [0, 1, 2, 3], 1: [0, 2]}
    assert back.scores_fingerprint == "abc" and back.model_fingerprint == "def"
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=120).print(back)
    assert "0 2" in out.getvalue() and "pads every layer" in out.getvalue()


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.pop("top_k"), "top_k"),
        (lambda d: d["kept"].update({"0": [2, 1]}), "kept.0"),
        (lambda d: d["kept"].update({"1": [0, 99]}), "kept.1"),
        (lambda d: d["kept"].update({"1": [0]}), "kept.1"),
        (lambda d: d["kept"].update({"x": [0, 1]}), "kept.x"),
        (lambda d: d.update(kept=[]), "kept"),
        (lambda d: d["counts"].update({"0": 7}), "counts"),
        (lambda d: d.update(uniform=True), "uniform"),
        (lambda d: d.update(model_fingerprint=5), "model_fingerprint"),
    ],
)
def test_bad_plan_files_name_the_field(tmp_path, change, field):
    plan = sel.select_experts(table({0: [5, 4, 3, 2], 1: [9, 0.1, 0.2, 0.1]}), budget=60, top_k=2, uniform=False)
    data = plan.to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UspxError, match=rf"bad\.json: field '{field}'"):
        sel.load_plan(path)


def test_plan_file_not_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(UspxError, match="plan.json: not valid JSON"):
        sel.load_plan(path)
    path.write_text("[1, 2]")
    with pytest.raises(UspxError, match="not a uspx plan"):
        sel.load_plan(path)
