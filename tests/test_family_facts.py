"""The family facts the adapters answer for the rest of uspx (attention projections, head layout,
dense-MLP and expert down projections, attention sinks, stored MXFP4), checked against what
transformers' own modules and the checkpoint files hold, and the tiny configs that live with them."""

from __future__ import annotations

import pytest
import torch

from uspx.io import UspxError
from uspx.models import ADAPTERS, adapter_class, adapter_for, is_mxfp4_tensor
from uspx.testing import TINY_CONFIGS, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

GQA = ["gpt_oss", "granitemoe", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("family", GQA)
def test_head_shape_and_projections_are_transformers_own(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    attn = [layer.self_attn for layer in model.model.layers]
    hd = attn[0].head_dim  # transformers' own attention module
    want = (attn[0].q_proj.out_features // hd, attn[0].k_proj.out_features // hd, hd)
    assert adapter.head_shape() == want
    assert adapter.attention_modules(model) == attn
    assert all(adapter.attention_out(a) is a.o_proj for a in attn)
    assert [getattr(attn[0], n) for n in (adapter.query_proj, *adapter.key_value_projs)] == [
        attn[0].q_proj, attn[0].k_proj, attn[0].v_proj]


def test_set_head_shape_builds_the_smaller_attention():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3_moe")
    adapter_class("qwen3_moe").set_head_shape(cfg, 2, 1, 8)
    attn = AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)


def test_head_width_defaults_to_hidden_over_heads():
    cfg = tiny_config("mixtral")  # no head_dim field set: 32 hidden / 4 heads
    cfg.head_dim = None
    assert adapter_class("mixtral").config_head_shape(cfg) == (4, 2, 8)


def test_layers_without_attention_are_named():
    model = tiny_model("jamba")  # layer 0 is a mamba layer
    with pytest.raises(UspxError, match="decoder layer 0 has no attention module"):
        adapter_for(model).attention_modules(model)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_attention_of_the_layer_holding_each_moe_block(family):
    from uspx.analyze.collect import attention_module

    model = tiny_model(family)
    adapter = adapter_for(model)
    path = "norm_attn_norm.attn" if family == "dbrx" else "self_attn"
    for layer in adapter.layers:
        parent = model.get_submodule(layer.name.rsplit(".", 1)[0])
        want = parent.get_submodule(path) if family != "jamba" or layer.index == 1 else None
        assert attention_module(adapter, layer) is want


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_sinks_only_in_gpt_oss(family):
    model = tiny_model(family)
    has = any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules())
    assert has == (family == "gpt_oss")
    assert adapter_for(model).has_attention_sinks() == has


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_down_projection(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    down = layer.experts.down_proj
    assert adapter.expert_down(layer) is down
    width = adapter.expert_width()
    dim, index = adapter.expert_down_layout(layer, width)
    assert down.shape[dim] == width  # mixtral [E, H, I], gpt_oss [E, I, H]
    assert torch.equal(index[:, 0], torch.arange(width))


def test_dense_mlp_projections():
    model = tiny_model("qwen2_moe")
    adapter = adapter_for(model)
    mlps = adapter.dense_mlps(model)
    shared = model.model.layers[0].mlp.shared_expert
    assert [(i, k, m) for i, k, m, _ in mlps] == [(0, 0, shared), (1, 0, model.model.layers[1].mlp.shared_expert)]
    assert adapter.dense_down(shared) is shared.down_proj
    assert adapter.dense_in_projs(shared) == {"gate_proj": shared.gate_proj, "up_proj": shared.up_proj}
    assert adapter.dense_down(model.model.layers[0].mlp) is None  # the MoE block has no down projection


def test_stored_mxfp4_tensors(tmp_path):
    from uspx.models.synthetic import write_gpt_oss
    from uspx.prune.files import weight_files

    mx = weight_files(write_gpt_oss(tmp_path / "mx", "tiny"))
    blocks = sorted(n for n, (tag, _, _) in mx.tensors.items() if tag == "U8" and n.endswith("down_proj_blocks"))
    assert blocks and mx.is_mxfp4()
    gpt = adapter_class("gpt_oss")
    for name in blocks:
        assert gpt.mxfp4_scales_name(name, "U8") == name.replace("_blocks", "_scales")
        assert name.replace("_blocks", "_scales") in mx.tensors
    assert gpt.mxfp4_scales_name(blocks[0], "BF16") is None
    assert adapter_class("mixtral").mxfp4_scales_name(blocks[0], "U8") is None
    assert not is_mxfp4_tensor("model.layers.0.mlp.experts.down_proj", "BF16")

    tiny_model("mixtral").save_pretrained(tmp_path / "bf16")
    assert not weight_files(tmp_path / "bf16").is_mxfp4()


def test_tiny_configs_cover_every_family():
    from uspx.models import tiny

    assert set(tiny.TINY_CONFIGS) == set(ADAPTERS)
    assert TINY_CONFIGS is tiny.TINY_CONFIGS
    first = tiny.tiny_config_kwargs("dbrx")
    first["ffn_config"]["moe_top_k"] = 1  # a fresh copy: the shared table stays as it was
    assert tiny.TINY_CONFIGS["dbrx"]["ffn_config"]["moe_top_k"] == 2
    with pytest.raises(UspxError, match="no tiny config for family 'llama'"):
        tiny_config("llama")


# Tensor and config names of particular families (and the suffixes of stored MXFP4 tensors): code
# outside uspx.models asks an adapter instead.
FAMILY_NAMES = {"down_proj", "o_proj", "q_proj", "k_proj", "v_proj", "gate_up_proj", "up_proj", "gate_proj",
                "num_key_value_heads", "head_dim", "sinks", "w1", "w2", "w3", "block_sparse_moe"}
FAMILY_OWNERS = ("models",)


def _family_names_in(path, rel: str) -> list[str]:
    import ast

    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FAMILY_NAMES:
            found.append(f"{rel}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            parts = node.value.replace("{}", "").split(".")
            if len(node.value) < 80 and (FAMILY_NAMES & set(parts) or node.value in ("_blocks", "_scales")):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_no_family_names_outside_the_adapters():
    from pathlib import Path

    import uspx

    root = Path(uspx.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if rel.split("/")[0] not in FAMILY_OWNERS and rel != "testing.py":
            found += _family_names_in(path, rel)
    assert found == []
