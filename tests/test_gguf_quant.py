"""Quantized GGUF files: the planner's bytes per weight against ggml's block layouts (computed here
from the structs of ggml-common.h), llama-quantize's *_M layer rule, and, with llama.cpp at hand,
files written by llama-quantize whose tensors hold exactly the bytes the block layouts give."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import llama_cpp_program, llama_cpp_source
from uspx.io import UspxError
from uspx.models.loading import BUNDLED_TEACHER
from uspx.plan import memory as mem

QK_K = 256  # ggml-common.h: weights per K-quant super-block
K_SCALE_SIZE = 12
HALF = 2  # ggml_half


# the block structs of ggml-common.h, field by field: (weights per block, bytes per block)
BLOCKS = {
    "Q4_0": (32, HALF + 32 // 2),                      # d; qs[QK4_0/2]
    "Q4_1": (32, 2 * HALF + 32 // 2),                  # d, m; qs
    "Q5_0": (32, HALF + 4 + 32 // 2),                  # d; qh[4]; qs
    "Q5_1": (32, 2 * HALF + 4 + 32 // 2),              # d, m; qh; qs
    "Q8_0": (32, HALF + 32),                           # d; int8 qs[32]
    "MXFP4": (32, 1 + 32 // 2),                        # e8m0 scale; qs[16]
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 * HALF),  # scales; qs; d, dmin
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + HALF),  # hmask; qs; scales[12]; d
    "Q4_K": (QK_K, 2 * HALF + K_SCALE_SIZE + QK_K // 2),  # d, dmin; scales; qs
    "Q5_K": (QK_K, 2 * HALF + K_SCALE_SIZE + QK_K // 8 + QK_K // 2),  # d, dmin; scales; qh; qs
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + HALF),  # ql; qh; int8 scales; d
    "IQ4_XS": (QK_K, HALF + 2 + QK_K // 64 + QK_K // 2),  # d; scales_h; scales_l; qs
}


def test_block_sizes_are_ggmls():
    for name, (block, size) in BLOCKS.items():
        assert mem.GGML_TYPES[name] == (block, size), name
        assert mem.ggml_bits(name) == pytest.approx(8 * size / block)
    assert mem.ggml_bits("Q8_0") == 8.5 and mem.ggml_bits("Q4_K") == 4.5 and mem.ggml_bits("Q6_K") == 6.5625
    assert mem.ggml_row_bytes("Q4_K", 2 * 256) == 288
    with pytest.raises(UspxError, match="whole blocks of 256"):
        mem.ggml_row_bytes("Q4_K", 2880)  # gpt-oss's width: llama-quantize falls back to a 32-block type
    with pytest.raises(UspxError, match="unknown ggml type"):
        mem.ggml_bits("Q7_K")


def test_more_bits_layers_follow_llama_quantize():
    # use_more_bits(i, n): i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, written out by hand
    assert mem.more_bits_layers(24) == len([0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23])
    assert mem.more_bits_layers(6) == len([2, 5])  # 6/8 = 0: every third layer from 2, and 7*6/8 = 5 on
    assert mem.more_bits_layers(32) == len([0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31])


def test_planner_sizes_a_q8_0_gguf_from_the_config():
    """Q8_0: every matrix (embeddings and output too) at 34 bytes per 32, vectors and routers F32."""
    p = mem.count_params(BUNDLED_TEACHER)
    est = mem.estimate(p, "q8_0", context=0)
    matrices = p.expert.matrix * p.num_experts * p.num_moe_layers + sum(
        part.matrix for name, part in p.other.items())
    vectors = (p.expert.vector * p.num_experts * p.num_moe_layers + sum(part.vector for part in p.other.values())
               + p.router_row.total * p.num_experts * p.num_moe_layers)
    want = matrices * 34 / 32 + vectors * 4
    assert est.weights_bytes == pytest.approx(want, abs=8)


def test_planner_q4_k_m_counts_the_down_projections_more_bits():
    p = mem.count_params(BUNDLED_TEACHER)
    prec = mem.gguf_precision("Q4_K_M", p.num_layers)
    share = 2 / 6  # layers 2 and 5 of 6
    assert prec.expert_bits == pytest.approx(4.5 * 2 / 3 + (share * 6.5625 + (1 - share) * 4.5) / 3)
    assert prec.lm_head_bits == 6.5625 and prec.embedding_bits == 4.5 and prec.other_bits == 32
    assert mem.precision("q8_0").lm_head_bits == 8.5
    with pytest.raises(UspxError, match="GGUF quantization"):
        mem.precision("q4_k_x")


def test_planner_follows_llama_quantizes_row_and_eight_expert_rules():
    """The teacher (hidden 256, experts 96 wide, 6 layers, K/V 128 x 256, output 256 x 256) at Q4_K_M,
    worked out by hand from llama.cpp's rules."""
    hidden, width, kv, o = 256, 96, 128 * 256, 256 * 256
    prec = mem.gguf_precision("Q4_K_M", 6, hidden=hidden, width=width, v_weights=kv, k_weights=kv, o_weights=o,
                              n_experts=16)
    # gate and up: rows of 256, Q4_K; down: rows of 96, so Q4_K -> Q5_0 (22/32 bytes), and in layers 2
    # and 5 Q6_K -> Q8_0 (34/32)
    down = (2 / 6) * 8.5 + (4 / 6) * 5.5
    assert prec.expert_bits == pytest.approx(4.5 * 2 / 3 + down / 3)
    assert prec.extra_bits == pytest.approx(2 * kv * (6.5625 - 4.5))  # V of layers 2 and 5: Q6_K
    eight = mem.gguf_precision("Q4_K_M", 6, hidden=hidden, width=width, v_weights=kv, k_weights=kv, o_weights=o,
                               n_experts=8)
    # 8 experts: K and V of every layer Q8_0, the attention output Q5_K
    assert eight.extra_bits == pytest.approx(6 * 2 * kv * (8.5 - 4.5) + 6 * o * (5.5 - 4.5))
    assert mem.gguf_row_type("Q4_K", 2880) == "Q5_0" and mem.gguf_row_type("Q6_K", 96) == "Q8_0"
    assert mem.gguf_row_type("Q5_K", 48) == "F16"  # not whole 32-blocks either
    assert mem.gguf_precision("Q4_K_M", hidden=2880).lm_head_bits == 8.5  # output rows not whole 256-blocks


# ----- with llama.cpp ---------------------------------------------------------------------------------
def stored_bytes(path) -> dict:
    """Per tensor, the bytes between its data offset and the next tensor's (the file's end for the
    last): what the file itself holds for it, up to the alignment padding."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = sorted(reader.tensors, key=lambda t: t.data_offset)
    ends = [t.data_offset for t in tensors[1:]] + [os.path.getsize(path)]
    return {t.name: (t, end - t.data_offset) for t, end in zip(tensors, ends)}


def holds(gap: int, n_elements: int, block: int, size: int, alignment: int = 32) -> bool:
    """Whether ``gap`` bytes are ``n_elements`` in blocks of ``block`` of ``size`` bytes, plus padding."""
    want = n_elements // block * size
    return want <= gap < want + alignment


def _llama_cpp() -> str | None:
    """The folder of llama.cpp's programs (llama-quantize, llama-imatrix): ``$USPX_LLAMA_CPP``, or None
    for PATH."""
    llama_cpp_program("llama-quantize")
    llama_cpp_program("llama-imatrix")
    return os.environ.get("USPX_LLAMA_CPP")


def _where(src: str | None) -> list[str]:
    return ["--llama-cpp", src] if src else []


@pytest.fixture(scope="module")
def teacher_f32(tmp_path_factory):
    pytest.importorskip("gguf")
    _llama_cpp()  # the programs: quantizing is what the tests of this file do
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.prune.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("quant") / "teacher-f32.gguf"
    export_gguf(BUNDLED_TEACHER, out, llama_cpp=llama_cpp_source(), outtype="f32")
    return out


def test_quantize_with_the_users_importance_matrix(teacher_f32, tmp_path):
    import gguf

    from uspx.prune.gguf_export import make_imatrix, quantize_gguf

    src = _llama_cpp()
    im = make_imatrix(teacher_f32, "python_dev", tmp_path / "im.gguf", llama_cpp=src, threads=1)
    assert im["chunks"] >= 2 and (tmp_path / "im.gguf").stat().st_size > 0
    plain = quantize_gguf(teacher_f32, tmp_path / "plain.gguf", "Q4_K_M", llama_cpp=src, threads=1)
    guided = quantize_gguf(teacher_f32, tmp_path / "guided.gguf", "Q4_K_M", imatrix=tmp_path / "im.gguf",
                           llama_cpp=src, threads=1)
    a = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "plain.gguf")).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "guided.gguf")).tensors}
    assert any(a[n].data.tobytes() != b[n].data.tobytes() for n in a if a[n].tensor_type.name == "Q4_K")
    for name, (t, gap) in stored_bytes(tmp_path / "guided.gguf").items():  # what the file holds per tensor
        block, size = BLOCKS.get(t.tensor_type.name, (1, {"F32": 4, "F16": 2}.get(t.tensor_type.name, 0)))
        assert holds(gap, int(np.prod([int(d) for d in t.shape])), block, size), name
    # the teacher's experts are 96 channels wide: the down projections' rows are not whole 256-blocks
    downs = [f for f in guided["fallbacks"] if "ffn_down_exps" in f["tensor"]]
    assert len(downs) == 6 and {f["columns"] for f in downs} == {96}
    assert {b[f["tensor"]].tensor_type.name for f in downs} == {f["used"] for f in downs} == {"Q5_0", "Q8_0"}
    # layers 2 and 5 get more bits (Q6_K, which falls back to Q8_0), the others Q4_K -> Q5_0
    assert {f["tensor"] for f in downs if f["used"] == "Q8_0"} == {"blk.2.ffn_down_exps.weight",
                                                                   "blk.5.ffn_down_exps.weight"}
    assert guided["parameter_bytes"] == plain["parameter_bytes"]
    assert guided["parameter_bytes"] == mem.estimate(BUNDLED_TEACHER, "q4_k_m", context=0).weights_bytes


def test_planner_q8_0_equals_the_file_and_cli(teacher_f32, tmp_path):
    from typer.testing import CliRunner

    from uspx.cli import app

    src = _llama_cpp()
    out = tmp_path / "q8.gguf"
    res = CliRunner().invoke(app, ["quantize", str(teacher_f32), "--quant", "Q8_0", "-o", str(out),
                                   *_where(src), "--threads", "1"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "q8.gguf.uspx.json").read_text())
    assert rec["parameter_bytes"] == mem.estimate(BUNDLED_TEACHER, "q8_0", context=0).weights_bytes
    res = CliRunner().invoke(app, ["quantize", str(teacher_f32), "--quant", "Q8_0", "-o", str(out), *_where(src)])
    assert res.exit_code != 0 and "exists" in str(res.exception)
    res = CliRunner().invoke(app, ["quantize", str(teacher_f32), "--quant", "Q9_9", "-o", str(tmp_path / "x.gguf"),
                                   *_where(src)])
    assert "not a llama-quantize type" in str(res.exception) and not (tmp_path / "x.gguf").exists()


def test_mxfp4_experts_stay_mxfp4(tmp_path):
    """gpt-oss's MXFP4 experts: MXFP4_MOE keeps them (17 bytes per 32 weights) and stores every other
    matrix Q8_0, planned to the byte; another type is refused with the way out named."""
    pytest.importorskip("gguf")
    src = _llama_cpp()
    from transformers import AutoTokenizer

    from uspx.models.synthetic import write_gpt_oss
    from uspx.prune.gguf_export import export_gguf, quantize_gguf

    tok = AutoTokenizer.from_pretrained(BUNDLED_TEACHER)
    model = write_gpt_oss(tmp_path / "mx", "tiny", vocab_size=len(tok))
    tok.save_pretrained(model)
    export_gguf(model, tmp_path / "mx.gguf", llama_cpp=llama_cpp_source())
    rec = quantize_gguf(tmp_path / "mx.gguf", tmp_path / "moe.gguf", "MXFP4_MOE", llama_cpp=src, threads=1)
    for name, (t, gap) in stored_bytes(tmp_path / "moe.gguf").items():
        if name.endswith("_exps.weight"):
            assert t.tensor_type.name == "MXFP4" and holds(gap, int(np.prod([int(d) for d in t.shape])), 32, 17), name
    assert rec["parameter_bytes"] == mem.estimate(model, "mxfp4_moe", context=0).weights_bytes
    with pytest.raises(UspxError, match="MXFP4_MOE keeps them"):
        quantize_gguf(tmp_path / "mx.gguf", tmp_path / "q4.gguf", "Q4_K_M", llama_cpp=src, threads=1)
    assert not (tmp_path / "q4.gguf").exists()
