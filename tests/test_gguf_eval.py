"""A GGUF candidate judged through llama.cpp: the loss of each side equals what transformers and
llama.cpp give when run directly in the test, the verdict is uspx's, and quantized files are
llama-quantize's own (types read back from the file).

Needs llama.cpp: a Python binding (xllamacpp, or ``pip install 'uspx[llama]'``) and, in
``$USPX_LLAMA_CPP``, a llama.cpp checkout with its converter and programs in ``build/bin``, as
tests/llama_cpp.sh sets up (``make test`` does)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from conftest import llama_cpp_program, llama_cpp_source, needs_llama_cpp, save_tiny, write_jsonl
from uspx.io import UspxError

gguf = pytest.importorskip("gguf")


def _installed() -> list[str]:
    import importlib.util

    return [b for b in ("llama_cpp", "xllamacpp") if importlib.util.find_spec(b) is not None]


def _binding():
    if not _installed():
        needs_llama_cpp("llama.cpp in Python is not installed (pip install 'uspx[llama]', or xllamacpp)")


def _tiny_with_a_real_tokenizer(path):
    """A tiny random gpt-oss with the bundled teacher's byte-level BPE tokenizer (llama.cpp needs its
    merges; the test suite's own tokenizer has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.testing import tiny_config

    tok = AutoTokenizer.from_pretrained(BUNDLED_TEACHER)
    cfg = tiny_config("gpt_oss")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # decisive logits and routing, as uspx.testing.tiny_model
            if p.dim() >= 2:
                p.normal_(0, 1.0 if "router" in name else 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny gpt-oss checkpoint, its float32 GGUF and a workload of held-out items."""
    _binding()
    from uspx.prune.gguf_export import export_gguf

    folder = tmp_path_factory.mktemp("gguf_eval")
    model = _tiny_with_a_real_tokenizer(folder / "model")
    export_gguf(model, folder / "f32.gguf", llama_cpp=llama_cpp_source(), outtype="f32", pre_tokenizer="gpt-2")
    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code", "split": "heldout"}
            for i in range(6)] + \
           [{"prompt": f"The {i}th fox", "completion": " jumps over the lazy dog again", "family": "prose",
             "split": "heldout"} for i in range(4)] + \
           [{"text": f"calibration text {i}: def g(y): return y + {i}", "family": "code", "split": "calibration"}
            for i in range(40)]
    return model, folder / "f32.gguf", write_jsonl(folder / "w.jsonl", rows), rows


def _ids(tok, row) -> tuple[list[int], int]:
    p = tok.encode(row["prompt"], add_special_tokens=False)
    return p + tok.encode(row["completion"], add_special_tokens=False), len(p)


def _loss(logits: np.ndarray, ids: list[int], start: int) -> tuple[float, int]:
    """Summed next-token cross-entropy (float64) over the completion tokens, from logits [T, V]."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-sum(logp[j - 1, ids[j]] for j in range(max(start, 1), len(ids)))), len(ids) - max(start, 1)


def _family_losses(run, rows, tok) -> dict[str, float]:
    """Token-weighted loss per family of ``run(ids) -> logits`` on the held-out rows."""
    sums: dict[str, list[float]] = {}
    for row in (r for r in rows if r.get("split") == "heldout"):
        ids, start = _ids(tok, row)
        nll, n = _loss(run(ids), ids, start)
        s = sums.setdefault(row["family"], [0.0, 0])
        s[0] += nll
        s[1] += n
    return {f: s[0] / s[1] for f, s in sums.items()}


def _llama_run(path):
    """Every position's logits of the GGUF for a list of ids, from llama.cpp run directly
    (tests/llama_logits.c: llama.h alone, with the settings uspx evaluates with, so the numbers agree
    to rounding)."""
    exe = llama_cpp_program("llama-logits")

    def run(ids):
        out = subprocess.run([str(exe), str(path), "520", "1"], input=" ".join(map(str, ids)).encode() + b"\n",
                             capture_output=True, check=True, timeout=120)
        return np.frombuffer(out.stdout, np.float32).reshape(len(ids), -1)
    return run


def _hf_run(model):
    """Every position's float32 logits of the checkpoint in transformers, for a list of ids."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def run(ids):
        with torch.no_grad():
            return hf(input_ids=torch.tensor([ids])).logits[0].numpy()

    return run


def test_gguf_candidate_against_transformers(converted, one_thread):
    from transformers import AutoTokenizer

    from uspx.evaluate.gguf import evaluate_gguf

    model, f32, wl, rows = converted
    tok = AutoTokenizer.from_pretrained(model)
    hf_run = _hf_run(model)

    want_t, want_c = _family_losses(hf_run, rows, tok), _family_losses(_llama_run(f32), rows, tok)
    res = evaluate_gguf(model, f32, wl, threads=1, speed=False, epsilon=0.01)
    for fam in ("code", "prose"):
        row = res["families"][fam]
        assert row["loss_teacher"] == pytest.approx(want_t[fam], abs=1e-5)
        assert row["loss_candidate"] == pytest.approx(want_c[fam], abs=1e-5)
        assert abs(row["delta"]) < 1e-3 and row["top1_agreement"] > 0.99  # same weights in float32
    assert res["teacher"]["runtime"] == "transformers" and res["candidate"]["runtime"].startswith("llama.cpp")
    assert res["acceptance"]["verdict"] == "pass"
    assert res["size"]["candidate"]["tensor_types"].keys() == {"F32"}
    assert res["settings"]["tokenizer_check"][str(f32)]["texts"] == 20  # 10 prompts and 10 completions


def test_quantized_candidate_against_its_f32_gguf(converted, tmp_path, one_thread):
    """Q8_0 through llama-quantize: the file holds Q8_0 matrices whose bytes are 34 per 32 weights;
    its loss is what llama.cpp gives on it directly; a tight epsilon fails the verdict where the
    delta exceeds it."""
    from transformers import AutoTokenizer

    from uspx.evaluate.gguf import evaluate_gguf
    from uspx.prune.gguf_export import quantize_gguf

    model, f32, wl, rows = converted
    llama_cpp_program("llama-quantize")
    rec = quantize_gguf(f32, tmp_path / "q8.gguf", "Q8_0", threads=1)
    q8 = tmp_path / "q8.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(str(q8)).tensors}
    q8_tensors = [t for t in tensors.values() if t.tensor_type.name == "Q8_0"]
    assert q8_tensors and rec["tensor_types"]["Q8_0"] == len(q8_tensors)
    for t in q8_tensors:  # 32 weights -> one f16 scale and 32 int8: 34 bytes
        assert int(t.n_bytes) == int(np.prod([int(d) for d in t.shape])) // 32 * 34, t.name

    tok = AutoTokenizer.from_pretrained(model)
    want_t, want_c = _family_losses(_llama_run(f32), rows, tok), _family_losses(_llama_run(q8), rows, tok)
    res = evaluate_gguf(f32, q8, wl, threads=1, speed=False, epsilon={"code": 1.0, "prose": -1.0})
    for fam in ("code", "prose"):
        assert res["families"][fam]["loss_teacher"] == pytest.approx(want_t[fam], abs=1e-5)
        assert res["families"][fam]["loss_candidate"] == pytest.approx(want_c[fam], abs=1e-5)
        assert res["families"][fam]["delta"] == pytest.approx(want_c[fam] - want_t[fam], abs=1e-5)
    assert res["settings"]["tokenizer"].endswith("(llama.cpp)")  # two GGUF files: the teacher file's tokenizer
    assert res["acceptance"]["verdict"] == "fail" and res["acceptance"]["failed_rules"] == ["delta_loss"]
    assert [c["ok"] for c in res["acceptance"]["checks"]] == [True, False]  # code within 1.0, prose above -1.0
    assert res["size"]["ratio"] == pytest.approx(rec["parameter_bytes"] / res["size"]["teacher"]["parameter_bytes"])


@pytest.mark.parametrize("binding", _installed() or [None])
def test_every_binding_against_transformers(converted, binding, one_thread):
    """Each installed binding runs the float32 GGUF as transformers runs the checkpoint."""
    from transformers import AutoTokenizer

    from uspx.evaluate.gguf import evaluate_gguf

    model, f32, wl, rows = converted
    tok = AutoTokenizer.from_pretrained(model)
    hf_run = _hf_run(model)

    want = _family_losses(hf_run, rows, tok)
    res = evaluate_gguf(model, f32, wl, threads=1, decode_tokens=4, binding=binding)
    assert res["candidate"]["runtime"] == f"llama.cpp ({binding})"
    for fam, loss in want.items():
        assert res["families"][fam]["loss_teacher"] == pytest.approx(loss, abs=1e-5)
        assert res["families"][fam]["loss_candidate"] == pytest.approx(loss, rel=1e-3)
    assert res["speed"]["candidate"]["decode_tokens_per_s"] > 0


def test_same_gguf_twice_is_identical_and_speed_is_measured(converted, tmp_path, one_thread):
    from uspx.evaluate.gguf import evaluate_gguf

    model, f32, wl, rows = converted
    res = evaluate_gguf(f32, f32, wl, threads=1, decode_tokens=4, out=tmp_path)
    assert res["overall"]["delta"] == 0.0 and res["overall"]["top1_agreement"] == 1.0
    assert res["overall"]["kl"] == pytest.approx(0.0, abs=1e-9)
    sp = res["speed"]
    assert sp["teacher"]["decode_tokens_per_s"] > 0 and sp["candidate"]["prefill_tokens_per_s"] > 0
    assert "note" not in sp  # same runtime on both sides
    assert (tmp_path / "evaluation.json").exists()


def test_refuses_other_vocabularies_and_missing_files(converted, tmp_path, one_thread):
    from uspx.evaluate.gguf import evaluate_gguf

    model, f32, wl, rows = converted
    with pytest.raises(UspxError, match="different vocabularies"):
        evaluate_gguf(save_tiny("gpt_oss", tmp_path / "other"), f32, wl, threads=1, speed=False)
    with pytest.raises(UspxError, match="no such GGUF file"):
        evaluate_gguf(model, tmp_path / "missing.gguf", wl, threads=1, speed=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UspxError, match="cannot load"):
        evaluate_gguf(model, bad, wl, threads=1, speed=False)


def test_cli_export_quantized_and_eval(converted, tmp_path, one_thread):
    """`uspx export --quant` with the user's importance matrix, then `uspx eval FILE.gguf`."""
    from typer.testing import CliRunner

    from uspx.cli import app

    model, f32, wl, rows = converted
    llama_cpp_program("llama-quantize")
    llama_cpp_program("llama-imatrix")
    out = tmp_path / "q8.gguf"
    res = CliRunner().invoke(app, ["export", str(model), "--llama-cpp", llama_cpp_source(), "--outtype", "f32",
                                   "--pre-tokenizer", "gpt-2", "--quant", "Q8_0", "--imatrix-workload", str(wl),
                                   "--threads", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    import json

    rec = json.loads((tmp_path / "q8.gguf.uspx.json").read_text())
    assert rec["quant"] == "Q8_0" and rec["imatrix"]["chunks"] >= 2 and rec["tensor_types"]["Q8_0"] > 0
    assert not list(tmp_path.glob(".uspx-quant-*"))  # the unquantized intermediate is gone
    res = CliRunner().invoke(app, ["eval", str(out), str(wl), "--teacher", str(model), "-o", str(tmp_path / "e"),
                                   "--no-speed", "--threads", "1"])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert ev["candidate"]["runtime"].startswith("llama.cpp") and "verdict" in res.output
    res = CliRunner().invoke(app, ["eval", str(out), str(wl), "--teacher", str(model), "-o", str(tmp_path / "e2"),
                                   "--streaming"])
    assert res.exit_code != 0 and "--streaming" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", str(out), str(wl), "--teacher", str(model), "-o", str(tmp_path / "e3"),
                                   "--max-pass-drop", "0.05"])  # not silently dropped: checked items are not run
    assert res.exit_code != 0 and "--max-pass-drop" in str(res.exception) and not (tmp_path / "e3").exists()


def test_memory_rule_from_two_gguf_files(converted, one_thread):
    """Without a config, the KV cache comes from the GGUF's metadata: here 2 layers of 2 KV heads of
    8 dims, layer 0 sliding over 8 tokens (llama.cpp's gpt-oss pattern), layer 1 at the full context."""
    from uspx.evaluate.gguf import evaluate_gguf

    model, f32, wl, rows = converted
    context = 100
    want_kv = (2 * 8 * 2) * (8 + context) * 2  # K and V, bf16
    res = evaluate_gguf(f32, f32, wl, threads=1, speed=False, memory_budget="1MiB", context=context)
    mem = res["memory"]
    assert mem["kv_bytes"] == want_kv and "sliding" in mem["kv_from"]
    assert mem["weights_bytes"] == res["size"]["candidate"]["parameter_bytes"]
    assert mem["fits"] == (mem["weights_bytes"] + want_kv <= 2**20)
    assert any(c["rule"] == "memory_fit" for c in res["acceptance"]["checks"])
