"""Every family adapter against what the family's own transformers code does.

Routing is compared with the (weights, index) the model itself hands its experts module; restriction
with a physically pruned, saved and stock-reloaded checkpoint; ``expert_outputs`` with the expert
MLP written out by hand from the fused tensors (which pins each family's layout); byte counts with
the state dict and with what pruning actually removes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uspx.io import UspxError
from uspx.models import ADAPTERS, adapter_for
from uspx.prune import export
from uspx.testing import TINY_CONFIGS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

FAMILIES = sorted(ADAPTERS)

# Decoder layers that hold a MoE block in each tiny config (written out, not derived).
MOE_LAYERS = {
    "dbrx": [0, 1],
    "deepseek_v3": [1],  # first_k_dense_replace=1
    "gpt_oss": [0, 1],
    "granitemoe": [0, 1],
    "jamba": [1],  # expert_layer_period=2, offset=1
    "mixtral": [0, 1],
    "olmoe": [0, 1],
    "phimoe": [0, 1],
    "qwen2_moe": [0, 1],
    "qwen3_moe": [1],  # mlp_only_layers=[0]
}

_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def _model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if (family, dtype) not in _MODELS:
        _MODELS[family, dtype] = tiny_model(family, seed=0, dtype=dtype)
    return _MODELS[family, dtype]


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _run(model: torch.nn.Module, adapter, ids: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Logits, raw router logits per layer, and (index, weights) each experts module received."""
    logits, routed, handles = {}, {}, []
    for layer in adapter.layers:

        def router_hook(module, args, out, i=layer.index):
            logits[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        def experts_hook(module, args, i=layer.index):
            routed[i] = (args[1].detach().clone(), args[2].detach().clone())

        handles.append(layer.router.register_forward_hook(router_hook))
        handles.append(layer.experts.register_forward_pre_hook(experts_hook))
    try:
        with torch.no_grad():
            out = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return out, logits, routed


def _by_index(weights: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots sorted by expert id, so top-k order (unspecified for sorted=False) does not matter."""
    order = index.argsort(dim=-1)
    return weights.gather(-1, order), index.gather(-1, order)


def _half(adapter, seed: int = 0) -> dict[int, list[int]]:
    """Half the experts of every MoE layer, chosen at random; for grouped routers (deepseek) half of
    every group, the case where restriction and pruning coincide."""
    gen = torch.Generator().manual_seed(seed)
    groups = int(getattr(adapter.config, "n_group", None) or 1)
    kept = {}
    for layer in adapter.layers:
        size = layer.num_experts // groups
        ids = []
        for g in range(groups):
            ids += (torch.randperm(size, generator=gen)[: size // 2] + g * size).tolist()
        kept[layer.index] = sorted(ids)
    return kept


def _state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the saved state dict, tied tensors once."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


# ----- structure and routing --------------------------------------------------------------------
def test_every_family_has_a_tiny_config():
    assert set(FAMILIES) == set(TINY_CONFIGS) == set(MOE_LAYERS)
    assert len(FAMILIES) == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_route_matches_model(family, dtype):
    """bf16 pins the dtypes: some routers return fp32 weights, others cast back to the model's."""
    model = _model(family, dtype)
    adapter = adapter_for(model)
    assert type(adapter).family == family
    assert [l.index for l in adapter.layers] == MOE_LAYERS[family]
    _, logits, routed = _run(model, adapter, _ids())
    assert set(routed) == set(MOE_LAYERS[family])
    for layer in adapter.layers:
        assert logits[layer.index].shape == (24, layer.num_experts)
        weights, index = adapter.route(layer, logits[layer.index])
        ref_index, ref_weights = routed[layer.index]
        assert weights.dtype == ref_weights.dtype
        w, i = _by_index(weights, index)
        rw, ri = _by_index(ref_weights, ref_index)
        assert torch.equal(i, ri), f"{family} layer {layer.index}: routed experts differ"
        torch.testing.assert_close(w, rw, rtol=0, atol=1e-6)


def test_deepseek_route_uses_bias_and_groups():
    """The tiny deepseek routing depends on the correction bias and on the group choice, so the
    comparison above would catch a router that dropped either."""
    model = _model("deepseek_v3")
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    _, logits, routed = _run(model, adapter, _ids())
    lg = logits[layer.index]
    plain = torch.topk(lg.sigmoid() + layer.router.e_score_correction_bias, 2, dim=-1)[1]
    no_bias = torch.topk(lg.sigmoid(), 2, dim=-1)[1]
    ref = routed[layer.index][0].sort(dim=-1)[0]
    assert not torch.equal(plain.sort(dim=-1)[0], ref)  # grouping matters
    assert not torch.equal(no_bias.sort(dim=-1)[0], ref)  # the bias matters


# ----- restriction and pruning ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_restrict_equals_pruned_reloaded(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(family)
    adapter = adapter_for(model)
    ids = _ids()
    kept = _half(adapter)
    full, _, _ = _run(model, adapter, ids)
    with adapter.restrict(kept):
        restricted, _, routed = _run(model, adapter, ids)
    for idx, (index, _) in routed.items():
        banned = set(range(adapter.num_experts)) - set(kept[idx])
        assert not banned & set(index.unique().tolist()), f"{family} layer {idx} routed a banned expert"
    # The restriction is undone on exit and did change the model.
    again, _, _ = _run(model, adapter, ids)
    assert torch.equal(again, full)
    assert (restricted - full).abs().max() > 1e-4

    model.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", kept, tmp_path / "out")  # sliced on disk, verified before it is written
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert adapter_for(reloaded).num_experts == adapter.num_experts // 2
    with torch.no_grad():
        small = reloaded(ids).logits
    assert (small - restricted).abs().max() <= 1e-5


def test_deepseek_restriction_never_routes_banned_when_groups_run_short():
    """Kept {0, 4}: each group of 4 keeps one expert, so no chosen group holds top-k allowed experts;
    the router must fall back to the allowed ones instead of picking a banned expert."""
    model = _model("deepseek_v3")
    adapter = adapter_for(model)
    with adapter.restrict({1: [0, 4]}):
        _, _, routed = _run(model, adapter, _ids())
    assert routed[1][0].sort(dim=-1)[0].unique(dim=0).tolist() == [[0, 4]]
    with pytest.raises(UspxError, match="n_group"):
        adapter.pruned_config(3)  # 3 kept experts cannot form 2 equal groups


# ----- expert outputs ---------------------------------------------------------------------------
def _ref_gpt_oss(model, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    p = lambda n: model.get_parameter(f"{name}.experts.{n}")[e]  # noqa: E731
    limit, alpha = model.config.swiglu_limit, model.config.swiglu_alpha
    gate_up = x @ p("gate_up_proj") + p("gate_up_proj_bias")  # [H, 2I], gate/up interleaved
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ p("down_proj") + p("down_proj_bias")


def _ref_fused(model, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up = model.get_parameter(f"{name}.experts.gate_up_proj")[e]  # [2I, H], gate rows first
    down = model.get_parameter(f"{name}.experts.down_proj")[e]  # [H, I]
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def _ref_dbrx(model, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    f = model.config.ffn_config.ffn_hidden_size
    p = lambda n: model.get_parameter(f"{name}.experts.mlp.{n}")[e * f : (e + 1) * f]  # noqa: E731
    return (F.silu(x @ p("w1").T) * (x @ p("v1").T)) @ p("w2")


REFERENCE = {"gpt_oss": _ref_gpt_oss, "dbrx": _ref_dbrx}


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_outputs_match_hand_reference(family):
    model = _model(family)
    adapter = adapter_for(model)
    act = getattr(model.config, "hidden_act", None) or model.config.ffn_config.ffn_act_fn["name"]
    assert act == "silu" or family == "gpt_oss"  # the references below assume SwiGLU with silu
    ref = REFERENCE.get(family, _ref_fused)
    gen = torch.Generator().manual_seed(2)
    for layer in adapter.layers:
        e_count = layer.num_experts
        for t in adapter.expert_tensors(layer).values():
            assert t.shape[0] == e_count
        hidden = torch.randn(5, model.config.hidden_size, generator=gen)
        index = torch.tensor([[1, e_count - 1], [e_count - 1, 3], [0, 1], [3, 2], [2, 0]])
        with torch.no_grad():
            out = adapter.expert_outputs(layer, hidden, index)
            expected = torch.stack(
                [torch.stack([ref(model, layer.name, int(e), x) for e in row]) for x, row in zip(hidden, index)]
            )
        assert out.shape == (5, 2, model.config.hidden_size)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_bytes_add_up_and_pruning_removes_exactly_the_experts(family, tmp_path):
    from uspx.prune import weight_files

    model = _model(family)
    adapter = adapter_for(model)
    total = _state_bytes(model)
    per = {l.index: adapter.bytes_per_expert(l) for l in adapter.layers}
    assert sum(per[l.index] * l.num_experts for l in adapter.layers) + adapter.other_bytes() == total
    assert adapter.total_bytes() == total
    kept = _half(adapter, seed=3)
    model.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", kept, tmp_path / "out")
    removed = sum(per[l.index] * (l.num_experts - len(kept[l.index])) for l in adapter.layers)
    assert weight_files(tmp_path / "out").tensor_bytes == weight_files(tmp_path / "src").tensor_bytes - removed


# ----- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_validate_kept_errors(family):
    adapter = adapter_for(_model(family))
    layer = adapter.layers[0]
    k, e = adapter.top_k, adapter.num_experts
    with pytest.raises(UspxError, match="fewer than top-k"):
        adapter.validate_kept({layer.index: list(range(k - 1))}, allow_missing=True)
    with pytest.raises(UspxError, match="not a MoE layer"):
        adapter.validate_kept({99: list(range(k))}, allow_missing=True)
    with pytest.raises(UspxError, match="repeats"):
        adapter.validate_kept({layer.index: [0] + list(range(k))}, allow_missing=True)
    with pytest.raises(UspxError, match="outside"):
        adapter.validate_kept({layer.index: list(range(k - 1)) + [e]}, allow_missing=True)
    with pytest.raises(UspxError, match="not a MoE layer"):
        adapter.restrict({99: list(range(k))})


def test_prune_refuses_missing_layers_and_uneven_counts(tmp_path):
    _model("mixtral").save_pretrained(tmp_path / "src")
    with pytest.raises(UspxError, match="no entry"):
        export(tmp_path / "src", {0: [0, 1, 2, 3]}, tmp_path / "a")
    with pytest.raises(UspxError, match="non-uniform"):
        export(tmp_path / "src", {0: [0, 1, 2, 3], 1: [0, 1, 2]}, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unsupported_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UspxError) as err:
        adapter_for(LlamaForCausalLM(cfg))
    msg = str(err.value)
    assert "llama" in msg
    for family in FAMILIES:
        assert family in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_count_params_from_the_config_matches_the_built_model(family):
    """Each family's own parameter formula (config only) against the tensors transformers builds."""
    from uspx.models import adapter_class
    from uspx.testing import tiny_config

    model = _model(family)
    p = adapter_class(model.config.model_type).count_params(tiny_config(family))
    state = dict(model.named_parameters())
    # deepseek's e_score_correction_bias is a buffer but ships in the checkpoint, pruned with its expert
    state.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert p.total_params == sum(t.numel() for t in state.values())
    assert p.expert_params == sum(t.numel() for n, t in state.items() if ".experts." in n)
    assert list(p.moe_layers) == MOE_LAYERS[family]
    assert p.num_experts == adapter_for(model).num_experts
