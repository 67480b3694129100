"""Pruning a GGUF file in place: kept experts byte for byte whatever the quantization, the expert
count patched, everything else unchanged; plans that llama.cpp could not load are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from uspx.io import UspxError  # noqa: E402
from uspx.prune.gguf_file import expert_tensor_layer, prune_gguf  # noqa: E402

E, H, FF = 4, 64, 32  # Q8_0 and MXFP4 blocks are 32 wide


def _weights(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_moe_gguf(path, layers=2, used=2, types=None, router_bias=False):
    """A small MoE GGUF as llama.cpp's converter lays it out: experts outermost."""
    types = types or {"gate": gguf.GGMLQuantizationType.Q8_0, "up": gguf.GGMLQuantizationType.MXFP4,
                      "down": gguf.GGMLQuantizationType.F16}
    w = gguf.GGUFWriter(str(path), arch="qwen3moe")
    w.add_block_count(layers)
    w.add_expert_count(E)
    w.add_expert_used_count(used)
    w.add_context_length(128)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", _weights(0, 10, H))
    floats = {}
    for l in range(layers):
        for part, shape in (("gate", (E, FF, H)), ("up", (E, FF, H)), ("down", (E, H, FF))):
            x = _weights(10 * l + len(part), *shape)
            floats[l, part] = x
            kind = types[part]
            if kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(f"blk.{l}.ffn_{part}_exps.weight", x.astype(np.float16))
            else:
                w.add_tensor(f"blk.{l}.ffn_{part}_exps.weight", gguf.quants.quantize(x, kind),
                             raw_dtype=kind)
        floats[l, "inp"] = _weights(100 + l, E, H)
        w.add_tensor(f"blk.{l}.ffn_gate_inp.weight", floats[l, "inp"])
        if router_bias:
            floats[l, "bias"] = _weights(300 + l, E)
            w.add_tensor(f"blk.{l}.ffn_gate_inp.bias", floats[l, "bias"])
        w.add_tensor(f"blk.{l}.attn_q.weight", _weights(200 + l, H, H).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return floats, types


def test_prune_gguf_keeps_expert_bytes_and_patches_the_count(tmp_path):
    floats, types = write_moe_gguf(tmp_path / "m.gguf")
    kept = {0: [1, 3], 1: [2, 0]}
    record = prune_gguf(tmp_path / "m.gguf", kept, tmp_path / "p.gguf")
    r = gguf.GGUFReader(str(tmp_path / "p.gguf"))
    assert r.fields["qwen3moe.expert_count"].contents() == 2
    assert r.fields["qwen3moe.expert_used_count"].contents() == 2
    assert r.fields["general.name"].contents() == "tiny"
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    tensors = {t.name: t for t in r.tensors}
    for l, ids in kept.items():
        ids = sorted(ids)
        for part in ("gate", "up", "down"):
            t = tensors[f"blk.{l}.ffn_{part}_exps.weight"]
            assert t.tensor_type == types[part]
            x = floats[l, part][ids]  # the kept experts' weights, quantized on their own
            want = x.astype(np.float16) if types[part] == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(x, types[part])
            assert t.data.tobytes() == np.ascontiguousarray(want).tobytes()
        np.testing.assert_array_equal(tensors[f"blk.{l}.ffn_gate_inp.weight"].data, floats[l, "inp"][ids])
        assert tensors[f"blk.{l}.attn_q.weight"].data.shape == (H, H)
    assert record["kept_count"] == 2 and record["check"]["tensors"] == len(r.tensors)
    assert record["bytes"] < record["source_bytes"]


def test_prune_gguf_refuses_what_llama_cpp_could_not_load(tmp_path):
    write_moe_gguf(tmp_path / "m.gguf")
    cases = [({0: [0, 1], 1: [0, 1, 2]}, "one expert count"),
             ({0: [0], 1: [1]}, "fewer than the 2"),
             ({0: [0, 1]}, "layers"),
             ({0: [0, 4], 1: [0, 1]}, "outside"),
             ({0: [1, 1], 1: [0, 1]}, "twice")]
    for kept, message in cases:
        with pytest.raises(UspxError, match=message):
            prune_gguf(tmp_path / "m.gguf", kept, tmp_path / "p.gguf")
        assert not (tmp_path / "p.gguf").exists()
    with pytest.raises(UspxError, match="made for 8 experts"):
        prune_gguf(tmp_path / "m.gguf", {0: [0, 1], 1: [0, 1]}, tmp_path / "p.gguf", num_experts=8)
    assert not (tmp_path / "p.gguf").exists()  # a refused prune leaves no partial file
    (tmp_path / "p.gguf").write_bytes(b"x")
    with pytest.raises(UspxError, match="exists"):
        prune_gguf(tmp_path / "m.gguf", {0: [0, 1], 1: [0, 1]}, tmp_path / "p.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UspxError, match="cannot read GGUF"):
        prune_gguf(tmp_path / "bad.gguf", {0: [0, 1], 1: [0, 1]}, tmp_path / "q.gguf")


def test_expert_tensor_names():
    assert expert_tensor_layer("blk.12.ffn_down_exps.weight") == 12
    assert expert_tensor_layer("blk.3.ffn_gate_inp.bias") == 3
    assert expert_tensor_layer("blk.3.ffn_down_shexp.weight") is None  # shared expert: never sliced
    assert expert_tensor_layer("blk.3.attn_q.weight") is None


def test_cli_prune_gguf_by_a_plan_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from uspx.cli import app

    write_moe_gguf(tmp_path / "m.gguf")
    plan = {"format": "uspx-plan", "version": 1, "kept": {"0": [0, 2], "1": [1, 3]}, "top_k": 2, "num_experts": E,
            "predicted_bytes": 0, "method": "uniform", "uniform": True}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    res = CliRunner().invoke(app, ["prune-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "plan.json"),
                                   "-o", str(tmp_path / "p.gguf")])
    assert res.exit_code == 0, res.output
    assert gguf.GGUFReader(str(tmp_path / "p.gguf")).fields["qwen3moe.expert_count"].contents() == 2
    assert json.loads((tmp_path / "p.gguf.uspx.json").read_text())["kept"] == {"0": [0, 2], "1": [1, 3]}
    plan["heads"] = {"kv_groups": 1, "heads_per_group": 1, "original_kv_groups": 2, "original_heads_per_group": 1,
                     "kept": {"0": [1], "1": [0]}}  # a joint plan: whole experts are not all it cuts
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    res = CliRunner().invoke(app, ["prune-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "plan.json"),
                                   "-o", str(tmp_path / "q.gguf")])
    assert res.exit_code != 0 and "uspx prune" in str(res.exception) and not (tmp_path / "q.gguf").exists()


def test_runtime_notes_name_what_runtimes_refuse():
    from uspx.plan.select import runtime_notes

    assert runtime_notes({0: 8, 1: 8}, 4) == []
    notes = runtime_notes({0: 3, 1: 8}, 4)
    assert any("fewer than top-k = 4" in n for n in notes) and any("different counts" in n for n in notes)
    assert any("not a power of two" in n and "8 or 16" in n for n in runtime_notes([12], 4))
    padded = runtime_notes({0: 6, 1: 8}, 4, padded=True)
    assert any("pads to the largest" in n for n in padded) and not any("power of two" in n for n in padded)


def test_pre_tokenizer_declared_from_tokenizer_json(tmp_path):
    import json as _json

    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.prune.gguf_export import declared_pre_tokenizer

    assert declared_pre_tokenizer(BUNDLED_TEACHER) == "gpt-2"  # byte-level BPE with the GPT-2 split pattern
    (tmp_path / "tokenizer.json").write_text(_json.dumps({"pre_tokenizer": {"type": "Metaspace"}}))
    assert declared_pre_tokenizer(tmp_path) is None
    assert declared_pre_tokenizer(tmp_path / "nothing") is None


def test_export_gguf_with_llama_cpps_converter(tiny_gpt_oss_dir, tmp_path, one_thread):
    """With llama.cpp's converter at hand: a pruned tiny gpt-oss export converts, with the kept
    expert count, and the pruned-in-place GGUF of the full model equals it tensor for tensor."""
    from conftest import llama_cpp_source, write_jsonl
    from uspx.extract import extract
    from uspx.prune.gguf_export import export_gguf

    source = llama_cpp_source()
    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i}", "family": "code"} for i in range(12)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    extract(tiny_gpt_oss_dir, wl, tmp_path / "run", keep="50%", speed=False, progress=False)
    with pytest.raises(UspxError, match="--pre-tokenizer"):  # the test tokenizer is not one llama.cpp knows
        export_gguf(tmp_path / "run" / "model", tmp_path / "p.gguf", llama_cpp=source, outtype="f32")
    assert not (tmp_path / "p.gguf").exists()
    rec = export_gguf(tmp_path / "run" / "model", tmp_path / "p.gguf", llama_cpp=source, outtype="f32",
                      pre_tokenizer="gpt-2")
    pruned = gguf.GGUFReader(str(tmp_path / "p.gguf"))
    assert pruned.fields["gpt-oss.expert_count"].contents() == 4 and rec["pre_tokenizer"] == "gpt-2"
    export_gguf(tiny_gpt_oss_dir, tmp_path / "full.gguf", llama_cpp=source, outtype="f32", pre_tokenizer="gpt-2")
    kept = {int(l): v for l, v in json.loads((tmp_path / "run" / "plan.json").read_text())["kept"].items()}
    prune_gguf(tmp_path / "full.gguf", kept, tmp_path / "in_place.gguf")
    in_place = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "in_place.gguf")).tensors}
    for t in pruned.tensors:
        assert t.data.tobytes() == in_place[t.name].data.tobytes(), t.name


def test_prune_gguf_pads_a_non_uniform_plan_with_unroutable_experts(tmp_path):
    floats, types = write_moe_gguf(tmp_path / "m.gguf", router_bias=True)
    record = prune_gguf(tmp_path / "m.gguf", {0: [1, 3], 1: [0, 2, 3]}, tmp_path / "p.gguf")
    assert record["kept_count"] == 3 and record["padding"] == {"0": [0]} and record["padding_bytes"] > 0
    r = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "p.gguf")).tensors}
    bias = r["blk.0.ffn_gate_inp.bias"].data  # experts 0, 1, 3 in that order; 0 is the filler
    assert np.isneginf(bias[0]) and bias[1] == floats[0, "bias"][1] and bias[2] == floats[0, "bias"][3]
    np.testing.assert_array_equal(r["blk.1.ffn_gate_inp.bias"].data, floats[1, "bias"][[0, 2, 3]])
    # the kept expert's bytes are the source's
    want = gguf.quants.quantize(floats[0, "gate"][[3]], types["gate"])
    assert r["blk.0.ffn_gate_exps.weight"].data[2].tobytes() == want.tobytes()


def test_export_without_llama_cpps_source_says_where_to_get_it(tmp_path, monkeypatch):
    """`uspx export default` takes the bundled teacher; with neither --llama-cpp nor $USPX_LLAMA_CPP
    it names both and writes nothing."""
    from typer.testing import CliRunner

    from uspx.cli import app

    monkeypatch.delenv("USPX_LLAMA_CPP", raising=False)
    res = CliRunner().invoke(app, ["export", "default", "-o", str(tmp_path / "t.gguf")])
    assert res.exit_code != 0
    assert "--llama-cpp" in str(res.exception) and "USPX_LLAMA_CPP" in str(res.exception)
    assert list(tmp_path.iterdir()) == []
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "t.gguf")])
    assert res.exit_code != 0 and "not a model folder" in str(res.exception)
