"""Statistics from llama.cpp: importance-matrix files read as llama-imatrix writes them, routing
recorded through llama.cpp's evaluation callback against transformers' own routing on the same
tokens, and the GGUF-only extract.

The tests that run llama.cpp need a Python binding of it (xllamacpp or llama-cpp-python), its
converter's source and, for the imatrix comparison, its ``llama-imatrix`` program: ``$USPX_LLAMA_CPP``
as tests/llama_cpp.sh sets it up (``make test`` does). Without them they skip and say which is
missing; on CI they fail."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import struct
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from test_gguf import E, FF, H, write_moe_gguf  # noqa: E402  (a small MoE GGUF laid out as llama.cpp's converter does)
from conftest import llama_cpp_program, llama_cpp_source, needs_llama_cpp  # noqa: E402
from uspx.io import UspxError  # noqa: E402
from uspx.prune.gguf_file import read_model  # noqa: E402
from uspx.trace.llama import imatrix_experts, read_imatrix  # noqa: E402

TOP_K, TOKENS = 2, 40
NEEDS_BINDING = ("needs llama.cpp in Python: the dev extra's xllamacpp wheel (Linux x86-64) or llama-cpp-python "
                 "(which compiles llama.cpp, about 25 minutes on 2 cores)")


def _routed_activations(layers: int, seed: int = 0):
    """Per layer: each token's top-2 experts of 4 and, per routed pair, the activation entering the
    expert's down projection (FF wide) and the layer input (H wide), as llama-imatrix sees them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        ids = np.stack([rng.choice(E - 1, TOP_K, replace=False) for _ in range(TOKENS)])  # expert 3 never routed
        out.append((ids, rng.standard_normal((TOKENS, TOP_K, FF)), rng.standard_normal((TOKENS, H))))
    return out


def _by_expert(ids, act):
    """Per expert: routed pairs and the sum of squares of their activations (the test's own sums)."""
    counts = np.bincount(ids.reshape(-1), minlength=E)
    sums = np.zeros((E, act.shape[-1]))
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            sums[ids[t, s]] += act[t, s] ** 2
    return counts, sums


def _write_gguf_imatrix(path, routed):
    """An imatrix as imatrix.cpp's save_imatrix writes it: per weight, <name>.in_sum2 [experts, cols]
    and <name>.counts [experts, 1], float32, general.type imatrix and the imatrix.* keys."""
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture")  # imatrix.cpp writes no architecture
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    for l, (ids, act, x) in enumerate(routed):
        counts, down = _by_expert(ids, act)
        _, inp = _by_expert(ids, np.repeat(x[:, None, :], TOP_K, 1))
        for part, sums in (("gate", inp), ("up", inp), ("down", down)):
            w.add_tensor(f"blk.{l}.ffn_{part}_exps.weight.in_sum2", sums.astype(np.float32))
            w.add_tensor(f"blk.{l}.ffn_{part}_exps.weight.counts", counts.astype(np.float32)[:, None])
        w.add_tensor(f"blk.{l}.attn_q.weight.in_sum2", np.ones((1, H), np.float32))  # a dense weight: one row
        w.add_tensor(f"blk.{l}.attn_q.weight.counts", np.full((1, 1), TOKENS, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_imatrix_gives_each_experts_counts_and_channel_energy(tmp_path):
    write_moe_gguf(tmp_path / "m.gguf", used=TOP_K)
    model = read_model(tmp_path / "m.gguf")
    routed = _routed_activations(2)
    _write_gguf_imatrix(tmp_path / "imatrix.gguf", routed)
    im = read_imatrix(tmp_path / "imatrix.gguf")
    assert not im.legacy and im.datasets == ["calib.txt"] and (im.chunk_count, im.chunk_size) == (3, 512)
    ex = imatrix_experts(im, model)
    assert ex.tokens == TOKENS and ex.layers == [0, 1]
    for l, (ids, act, x) in enumerate(routed):
        counts, sums = _by_expert(ids, act)
        np.testing.assert_array_equal(ex.counts[l], counts)
        assert counts[3] == 0 and (ex.down_energy[l, 3] == 0).all()  # never routed: no energy, not NaN
        routed_e = counts > 0
        np.testing.assert_allclose(ex.down_energy[l][routed_e], sums[routed_e] / counts[routed_e, None], rtol=1e-6)
        x_sums = np.zeros((E, H))
        for t in range(TOKENS):
            x_sums[ids[t]] += x[t] ** 2
        np.testing.assert_allclose(ex.input_energy[l][routed_e], x_sums[routed_e] / counts[routed_e, None], rtol=1e-6)


def test_gguf_extract_from_an_imatrix_keeps_the_most_routed_experts(tmp_path):
    """`uspx extract MODEL.gguf WORKLOAD --imatrix FILE --keep 2`: frequency from the imatrix's
    counts, the two most routed experts of each layer kept, the GGUF pruned to them."""
    from typer.testing import CliRunner

    from uspx.cli import app

    write_moe_gguf(tmp_path / "m.gguf", used=TOP_K)
    routed = _routed_activations(2, seed=4)
    _write_gguf_imatrix(tmp_path / "imatrix.gguf", routed)
    from uspx.gguf_extract import extract_gguf

    report = extract_gguf(tmp_path / "m.gguf", "python_dev", tmp_path / "run", keep=2,
                          imatrix=tmp_path / "imatrix.gguf", evaluate=False, progress=False)
    for l, (ids, _, _) in enumerate(routed):
        counts = np.bincount(ids.reshape(-1), minlength=E)
        assert np.sort(counts)[-2] > np.sort(counts)[-3]  # no tie at the cut: one right answer
        assert report["kept"][str(l)] == sorted(np.argsort(-counts)[:2].tolist())
    assert report["statistics"]["tokens"] == TOKENS and report["method"] == "frequency"
    assert report["evaluation"] is None and "evaluate=False" in report["evaluation_note"]
    pruned = gguf.GGUFReader(str(tmp_path / "run" / "model.gguf"))
    assert pruned.fields["qwen3moe.expert_count"].contents() == 2
    res = CliRunner().invoke(app, ["extract", str(tmp_path / "m.gguf"), "python_dev", "--keep", "2", "--imatrix",
                                   str(tmp_path / "imatrix.gguf"), "--method", "reap", "-o", str(tmp_path / "run2")])
    assert res.exit_code != 0 and "not computable from an imatrix" in str(res.exception)


def test_legacy_imatrix_keeps_means_but_no_counts(tmp_path):
    """imatrix.cpp's save_imatrix_legacy: per entry its name, ncall and (sum / count) * ncall per
    value, 1 for an expert without data; then the chunk count and the dataset name."""
    write_moe_gguf(tmp_path / "m.gguf", used=TOP_K)
    model = read_model(tmp_path / "m.gguf")
    routed = _routed_activations(2, seed=1)
    ncall = 3
    blob = bytearray(struct.pack("<i", 2 * 3))
    for l, (ids, act, x) in enumerate(routed):
        counts, down = _by_expert(ids, act)
        for part, sums in (("down", down), ("gate", np.ones((E, H))), ("up", np.ones((E, H)))):
            c = np.where(counts > 0, counts, 1)[:, None]
            values = np.where(counts[:, None] > 0, sums / c, 1.0) * ncall
            name = f"blk.{l}.ffn_{part}_exps.weight".encode()
            blob += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, values.size)
            blob += values.astype("<f4").tobytes()
    blob += struct.pack("<i", ncall) + struct.pack("<i", 9) + b"calib.txt"
    (tmp_path / "imatrix.dat").write_bytes(bytes(blob))
    im = read_imatrix(tmp_path / "imatrix.dat")
    assert im.legacy and im.datasets == ["calib.txt"] and im.chunk_count == ncall
    ex = imatrix_experts(im, model)
    assert ex.counts is None and ex.tokens is None
    for l, (ids, act, _) in enumerate(routed):
        counts, sums = _by_expert(ids, act)
        np.testing.assert_allclose(ex.down_energy[l][counts > 0], (sums / np.maximum(counts, 1)[:, None])[counts > 0],
                                   rtol=1e-5)
    from uspx.gguf_extract import extract_gguf

    with pytest.raises(UspxError, match="legacy"):
        extract_gguf(tmp_path / "m.gguf", "python_dev", tmp_path / "run", keep=2, imatrix=tmp_path / "imatrix.dat",
                     progress=False)


def test_imatrix_of_another_model_is_refused(tmp_path):
    write_moe_gguf(tmp_path / "m.gguf", used=TOP_K)
    model = read_model(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), arch="imatrix")
    for l in range(2):
        w.add_tensor(f"blk.{l}.ffn_down_exps.weight.in_sum2", np.ones((E + 2, FF), np.float32))
        w.add_tensor(f"blk.{l}.ffn_down_exps.weight.counts", np.ones((E + 2, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UspxError, match="6 experts"):
        imatrix_experts(read_imatrix(tmp_path / "other.gguf"), model)
    (tmp_path / "junk.dat").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(UspxError, match="not an importance matrix"):
        read_imatrix(tmp_path / "junk.dat")


# ----- llama.cpp itself, on the bundled teacher's GGUF --------------------------------------------------
def _binding():
    from uspx.trace.llama_runtime import binding_name

    try:
        return binding_name()
    except UspxError:
        needs_llama_cpp(NEEDS_BINDING)


@pytest.fixture(scope="module")
def teacher_gguf(tmp_path_factory):
    """The bundled teacher converted by llama.cpp's own converter (float32: transformers' numbers)."""
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.prune.gguf_export import export_gguf

    _binding()
    source = llama_cpp_source()
    path = tmp_path_factory.mktemp("teacher_gguf") / "teacher.gguf"
    try:
        export_gguf(BUNDLED_TEACHER, path, llama_cpp=source, outtype="f32")
    except UspxError as exc:
        needs_llama_cpp(f"llama.cpp's converter is not in {source}: {exc}")
    return path


def _transformers_routing(token_lists):
    """transformers' own routing of the teacher (float32) on the same tokens: per item and layer the
    top-k ids, their gate weights, each routed expert's output norm (the experts' weights applied by
    the model's own gate function) and the squared activation entering the down projection."""
    import torch
    from transformers import AutoModelForCausalLM

    from uspx.models.loading import BUNDLED_TEACHER

    hf = AutoModelForCausalLM.from_pretrained(BUNDLED_TEACHER, dtype=torch.float32).eval()
    caught = {}
    for i, layer in enumerate(hf.model.layers):
        layer.mlp.router.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("router", i), out))
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: caught.__setitem__(("x", i), a[0]))
    out = []
    with torch.no_grad():
        for ids in token_lists:
            hf(input_ids=torch.tensor([ids]))
            per_layer = []
            for i, layer in enumerate(hf.model.layers):
                _, scores, index = caught[("router", i)]
                x = caught[("x", i)].reshape(len(ids), -1)
                ex = layer.mlp.experts
                norms = np.zeros(index.shape)
                acts = np.zeros((*index.shape, ex.intermediate_size))
                for t in range(len(ids)):
                    for s, e in enumerate(index[t].tolist()):
                        act = ex._apply_gate(x[t] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e])
                        norms[t, s] = float((act @ ex.down_proj[e] + ex.down_proj_bias[e]).norm())
                        acts[t, s] = act.numpy()
                per_layer.append((index.numpy(), scores.numpy(), norms, acts))
            out.append(per_layer)
    return out


TEXTS = ["def add(a, b):\n    return a + b\n", "ls -la /tmp | grep foo && echo done",
         "The quick brown fox jumps over the lazy dog. " * 4, "12 * 7 = 84\n30 + 12 = 42\n"]


def _installed() -> list[str | None]:
    from uspx.trace.llama_runtime import BINDINGS

    return [b for b in BINDINGS if importlib.util.find_spec(b) is not None] or [None]


@pytest.mark.parametrize("binding", _installed())
def test_llama_cpp_routing_matches_transformers(teacher_gguf, binding):
    from transformers import AutoConfig, AutoTokenizer

    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.trace.llama import record
    from uspx.trace.llama_runtime import Runtime

    tok = AutoTokenizer.from_pretrained(BUNDLED_TEACHER)
    lists = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    with Runtime(teacher_gguf, n_ctx=8, vocab_only=True, binding=binding) as rt:
        assert [rt.tokenize(t) for t in TEXTS] == lists  # the GGUF's vocabulary tokenises as the tokenizer does
    model = read_model(teacher_gguf)
    cfg = AutoConfig.from_pretrained(BUNDLED_TEACHER)  # K and V at f16 in every layer, from the config
    assert model.kv_bytes_per_token == cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * cfg.head_dim * 2
    rec = record(model, lists, norms=True, energy=True, n_threads=1, binding=binding)
    assert binding is None or rec.binding == binding
    assert rec.nodes == dict(ids="ffn_moe_topk", weights="ffn_moe_weights_softmax", norms="ffn_moe_down_biased",
                             energy="ffn_moe_swiglu_oai")
    hf = _transformers_routing(lists)
    counts = np.zeros((len(model.moe_layers), model.num_experts), np.int64)
    energy = np.zeros_like(rec.energy)
    for item, per_layer in zip(rec.items, hf):
        for l, (index, scores, norms, acts) in enumerate(per_layer):
            np.testing.assert_array_equal(item.ids[:, l], index)  # the same experts, highest weight first
            np.testing.assert_allclose(item.weights[:, l], scores, atol=2e-3)
            np.testing.assert_allclose(item.norms[:, l], norms, rtol=2e-3)
            counts[l] += np.bincount(index.reshape(-1), minlength=model.num_experts)
            np.add.at(energy[l], index.reshape(-1), (acts ** 2).reshape(-1, acts.shape[-1]))
    np.testing.assert_array_equal(rec.counts, counts)
    np.testing.assert_allclose(rec.energy, energy, rtol=5e-3, atol=1e-4)


def test_llama_imatrix_counts_match_transformers(teacher_gguf, tmp_path):
    """llama-imatrix's own file on the teacher's GGUF: per-expert counts equal transformers'
    routing of the same chunks, and the down projection's input energy within tolerance."""
    from uspx.trace.llama_runtime import Runtime

    exe = llama_cpp_program("llama-imatrix")
    text = "".join(TEXTS * 6)
    (tmp_path / "calib.txt").write_text(text)
    n_ctx = 64
    subprocess.run([str(exe), "-m", str(teacher_gguf), "-f", str(tmp_path / "calib.txt"), "-o",
                    str(tmp_path / "imatrix.gguf"), "-c", str(n_ctx), "-b", str(n_ctx), "--no-ppl", "-t", "1"],
                   check=True, capture_output=True, timeout=300)
    with Runtime(teacher_gguf, n_ctx=8, vocab_only=True) as rt:  # tokenised as imatrix.cpp does (add_special)
        tokens, plain = rt.tokenize(text, add_special=True), rt.tokenize(text)
    bos = tokens[0] if len(tokens) == len(plain) + 1 else None
    chunks = []
    for c in range(len(tokens) // n_ctx):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos  # imatrix.cpp puts BOS first in every chunk
        chunks.append(chunk)
    model = read_model(teacher_gguf)
    ex = imatrix_experts(read_imatrix(tmp_path / "imatrix.gguf"), model)
    counts = np.zeros((len(model.moe_layers), model.num_experts), np.int64)
    energy = np.zeros_like(ex.down_energy)
    for per_layer in _transformers_routing(chunks):
        for l, (index, _, _, acts) in enumerate(per_layer):
            counts[l] += np.bincount(index.reshape(-1), minlength=model.num_experts)
            np.add.at(energy[l], index.reshape(-1), (acts ** 2).reshape(-1, acts.shape[-1]))
    assert ex.tokens == len(chunks) * n_ctx
    np.testing.assert_array_equal(ex.counts, counts)
    mean = np.where(counts[..., None] > 0, energy / np.maximum(counts, 1)[..., None], 0.0)
    np.testing.assert_allclose(ex.down_energy, mean, rtol=5e-3, atol=1e-4)


def test_gguf_only_extract_scores_as_the_checkpoint_does(teacher_gguf, tmp_path):
    """`uspx extract teacher.gguf WORKLOAD --keep 50%`: routing recorded in llama.cpp, scored,
    selected, the GGUF pruned in place and judged; its frequency and REAP scores equal those uspx
    computes from transformers' trace of the same items, and the pruned file runs in llama.cpp."""
    from typer.testing import CliRunner

    from conftest import write_jsonl
    from uspx.cli import app
    from uspx.score.table import load_scores
    from uspx.score.trace_stats import stats_from_trace
    from uspx.trace import Trace, trace
    from uspx.trace.llama_runtime import Runtime

    rows = [{"text": t, "family": "code" if i % 2 == 0 else "prose", "split": "calibration"}
            for i, t in enumerate(TEXTS * 3)] + [{"text": "held out text", "split": "heldout"}]
    rows = [dict(r, id=str(i)) if r["split"] == "calibration" else r for i, r in enumerate(rows)]
    for i, r in enumerate(rows):  # distinct items (duplicates are skipped by the workload reader)
        r["text"] = r["text"] + f" #{i}"
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    res = CliRunner().invoke(app, ["extract", str(teacher_gguf), str(wl), "--keep", "50%", "-o",
                                   str(tmp_path / "run"), "--threads", "1", "--no-speed"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "reap" and set(report["counts"].values()) == {8}
    assert report["check"]["expert_count"] == 8
    ev = json.loads((tmp_path / "run" / "evaluation.json").read_text())  # judged in llama.cpp (either binding)
    assert ev["candidate"]["source"] == str(tmp_path / "run" / "model.gguf") and ev["workload"]["items"] == 1
    assert report["evaluation"]["acceptance"]["verdict"] == ev["acceptance"]["verdict"]
    assert report["evaluation"]["overall"]["delta"] == pytest.approx(ev["overall"]["delta"])
    pruned = gguf.GGUFReader(str(tmp_path / "run" / "model.gguf"))
    assert pruned.fields["gpt-oss.expert_count"].contents() == 8

    trace("default", wl, tmp_path / "hf_trace", split="calibration", norms=True, dtype="fp32", progress=False)
    hf = stats_from_trace(Trace(tmp_path / "hf_trace"), "all", norms=True)
    ll = stats_from_trace(Trace(tmp_path / "run" / "trace"), "all", norms=True)
    np.testing.assert_array_equal(ll.count, hf.count)
    columns = ["sample", "position", "token_id", "family", "is_completion", "layer", "expert_ids"]
    assert Trace(tmp_path / "run" / "trace").table(columns).to_pylist() == \
        Trace(tmp_path / "hf_trace").table(columns).to_pylist()  # the same rows, experts in the same order
    np.testing.assert_array_equal(ll.tokens, hf.tokens)
    np.testing.assert_allclose(ll.sum_weight_norm, hf.sum_weight_norm, rtol=5e-3)
    scores = load_scores(tmp_path / "run" / "scores")
    assert set(scores.methods) == {"frequency", "reap", "ean"}
    _, freq = scores.matrix("frequency")
    np.testing.assert_allclose(freq, hf.count.sum(0) / hf.tokens.sum(), rtol=1e-9)
    # capability with prose handed to tools: frequency over the code prompts alone
    from uspx.gguf_extract import _trace_scores
    from uspx.prune.gguf_file import read_model
    from uspx.workload import load_workload

    calibration = load_workload(wl).part("calibration")
    code = np.array([calibration.items[int(i)].family == "code" for i in hf.samples])
    table, _ = _trace_scores(read_model(teacher_gguf), tmp_path / "run" / "trace", load_workload(wl),
                             tmp_path / "capability", ["prose"], 0, 0)
    _, capability = table.matrix("capability")
    np.testing.assert_allclose(capability, hf.count[code].sum(0) / hf.tokens[code].sum(), rtol=1e-9)
    with Runtime(tmp_path / "run" / "model.gguf", n_ctx=32, n_threads=1) as rt:
        rt.decode(rt.tokenize("def f(x):\n    return x"))  # llama.cpp loads and runs the pruned file


# ----- the callback's reading of llama.cpp's nodes, without llama.cpp ------------------------------------
class _HostBuffers:
    """ggml's buffer query as the reader calls it: every tensor here is in host memory."""

    @staticmethod
    def ggml_backend_buffer_is_host(buffer):
        return True


def _node(name: str, values: np.ndarray, keep: list, ggml_type: int):
    """A ggml_tensor named ``name`` over ``values`` (numpy order: outermost first), with its strides."""
    from uspx.trace.llama_runtime import GgmlTensor

    t = GgmlTensor()
    t.type = ggml_type
    shape = values.shape[::-1] + (1,) * (4 - values.ndim)
    strides = values.strides[::-1]
    t.ne[:] = list(shape)
    t.nb[:] = list(strides) + [strides[-1] * shape[len(strides) - 1]] * (4 - len(strides))
    t.data = values.ctypes.data
    t.name = name.encode()
    keep += [t, values]
    return ctypes.addressof(t)


class _FakeRuntime:
    """Stands in for llama.cpp: each decode "computes" the nodes build_moe_ffn names, with the
    layouts llama.cpp gives them (top-k ids a strided view of the argsort, weights [T, k, 1], expert
    outputs [T, k, H], activations in float16), plus superseded and unrelated nodes."""

    layers, experts, k, hidden, width = (0, 1), 5, 2, 6, 4
    plan: dict = {}  # what the next decode leaves out
    truth: list = []  # per decode, per layer: ids, weights, outputs, activations as "computed"

    def __init__(self, path, *, n_ctx, n_threads=None, n_gpu_layers=0, callback=None, binding=None):
        from uspx.trace.llama_runtime import _Ggml

        self.callback, self.binding, self.ggml = callback, "fake", _Ggml(_HostBuffers())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def decode(self, tokens):
        from uspx.trace.llama_runtime import tensor_name

        keep: list = []
        rng = np.random.default_rng(len(tokens))
        truth = []
        for layer in self.layers:
            T, E, k = len(tokens), self.experts, self.k
            argsort = np.stack([rng.permutation(E) for _ in range(T)]).astype(np.int32)  # [T, E]
            weights = rng.random((T, k, 1)).astype(np.float32)
            out = rng.standard_normal((T, k, self.hidden)).astype(np.float32)
            act = rng.standard_normal((T, k, self.width)).astype(np.float16)
            truth.append((argsort[:, :k].copy(), weights[..., 0], out, act.astype(np.float32)))
            view = np.lib.stride_tricks.as_strided(argsort, shape=(T, k), strides=argsort.strides)
            nodes = [_node(f"attn_out-{layer}", out, keep, 0),  # not a MoE node: never asked for
                     _node(f"ffn_moe_topk-{layer}", view, keep, 26),  # the first k of each token's row
                     _node(f"ffn_moe_weights-{layer}", weights * 7, keep, 0),  # superseded by the softmax
                     _node(f"ffn_moe_weights_softmax-{layer}", weights, keep, 0),
                     _node(f"ffn_moe_down-{layer}", out * 3, keep, 0),  # superseded by the biased output
                     _node(f"ffn_moe_down_biased-{layer}", out, keep, 0)]
            if layer not in self.plan.get("no_activation", ()):
                nodes.append(_node(f"ffn_moe_swiglu_oai-{layer}", act, keep, 1))
            for address in nodes:
                asked = self.callback(address, True)
                assert asked == tensor_name(address).startswith("ffn_moe")
                if asked:
                    assert self.callback(address, False)
        _FakeRuntime.truth.append(truth)


def test_record_reads_the_nodes_llama_cpp_names(monkeypatch, tmp_path):
    from uspx.trace import llama, llama_runtime

    monkeypatch.setattr(llama_runtime, "Runtime", _FakeRuntime)
    _FakeRuntime.truth, _FakeRuntime.plan = [], {}
    f = _FakeRuntime
    model = llama.GGUFModel(str(tmp_path / "m.gguf"), "fake", 2, f.experts, f.k, list(f.layers), {}, 1, 1, 1, "x", 64, 0)
    rec = llama.record(model, [[1, 2, 3], [4, 5, 6, 7, 8]], norms=True, energy=True)
    assert rec.nodes == dict(ids="ffn_moe_topk", weights="ffn_moe_weights_softmax", norms="ffn_moe_down_biased",
                             energy="ffn_moe_swiglu_oai")
    counts = np.zeros((2, f.experts), np.int64)
    energy = np.zeros((2, f.experts, f.width))
    for item, truth in zip(rec.items, _FakeRuntime.truth):
        for l, (ids, weights, out, act) in enumerate(truth):
            np.testing.assert_array_equal(item.ids[:, l], ids)
            np.testing.assert_array_equal(item.weights[:, l], weights)
            np.testing.assert_allclose(item.norms[:, l], np.linalg.norm(out.astype(np.float64), axis=-1), rtol=1e-6)
            counts[l] += np.bincount(ids.reshape(-1), minlength=f.experts)
            for t in range(ids.shape[0]):
                for s in range(f.k):
                    energy[l, ids[t, s]] += act[t, s].astype(np.float64) ** 2
    np.testing.assert_array_equal(rec.counts, counts)
    np.testing.assert_allclose(rec.energy, energy, rtol=1e-6)

    _FakeRuntime.plan = {"no_activation": (1,)}
    with pytest.raises(UspxError, match="layer 1 has no act"):
        llama.record(model, [[1, 2]], norms=True, energy=True)
