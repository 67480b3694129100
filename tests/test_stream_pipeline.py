"""Streaming end to end: a streaming trace folder equals the whole-model one, local scores equal
``uspx.score``'s, a killed streaming trace resumes to the same result, and ``extract --streaming``
on an MXFP4 checkpoint writes an MXFP4 checkpoint that stock transformers loads and that equals
the original restricted to the kept experts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tokenizer, write_jsonl
from uspx.cli import app
from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.models.synthetic import write_gpt_oss
from uspx.score import score
from uspx.stream import folder
from uspx.stream.score import score_streaming
from uspx.trace import Trace, trace

FLOATS = ("expert_weights", "router_logits", "expert_norms")
LOCAL = ["frequency", "reap", "ean", "reconstruction"]
# few items of few lengths: streaming batches equal-length sequences, and CPU grouped_mm calls are slow
ROWS = [{"prompt": f"def {'abcdefghijkl'[i]}(x):", "completion": f" return x+{i % 2 * 10}", "family": "code" if i % 2 else "prose",
         "split": "heldout" if i >= 9 else "calibration"} for i in range(12)]


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("wl") / "w.jsonl", ROWS)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    path = write_gpt_oss(tmp_path_factory.mktemp("mx") / "tiny", "tiny", max_shard_bytes=200_000)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def traces(tiny_gpt_oss_dir, workload, tmp_path_factory):
    """The same workload traced by the whole-model path and by the streaming CLI."""
    root = tmp_path_factory.mktemp("traces")
    whole = trace(tiny_gpt_oss_dir, workload, root / "whole", logits=True, norms=True, progress=False)
    res = CliRunner().invoke(app, ["trace", str(tiny_gpt_oss_dir), str(workload), "-o", str(root / "stream"),
                                   "--logits", "--norms", "--streaming", "--reconstruction", "--compute-dtype", "fp32"])
    assert res.exit_code == 0, res.output
    return root / "whole", root / "stream", whole


def _assert_same_trace(a, b):
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["format"] == mb["format"] and ma["model"] == mb["model"] and ma["workload"] == mb["workload"]
    assert mb["options"]["streaming"] is True
    assert {k: v for k, v in mb["options"].items() if k in ma["options"]} == ma["options"]
    assert [s["file"] for s in ma["shards"]] == [s["file"] for s in mb["shards"]] and mb["complete"]
    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))
    for s in ma["shards"]:
        ta, tb = pq.read_table(a / s["file"]), pq.read_table(b / s["file"])
        assert ta.schema == tb.schema
        for col in ta.column_names:
            if col in FLOATS:
                np.testing.assert_allclose(np.array(tb.column(col).to_pylist()), np.array(ta.column(col).to_pylist()),
                                           rtol=1e-4, atol=1e-4, err_msg=col)
            else:
                assert tb.column(col).to_pylist() == ta.column(col).to_pylist(), col


def test_streaming_trace_folder_equals_whole_model(traces):
    whole, stream, _ = traces
    _assert_same_trace(whole, stream)
    tr = Trace(stream)  # the ordinary reader takes it
    assert tr.moe_layers == Trace(whole).moe_layers
    assert (stream / folder.RECONSTRUCTION).exists() and not (stream / folder.STAGING).exists()


def test_streaming_local_scores_equal_whole_model(traces, tiny_gpt_oss_dir, workload, tmp_path):
    whole, stream, _ = traces
    want = score(tiny_gpt_oss_dir, whole, workload, tmp_path / "a", methods=LOCAL, bootstrap=50, progress=False)
    got = score_streaming(tiny_gpt_oss_dir, stream, tmp_path / "b", LOCAL, workload=workload, bootstrap=50,
                          progress=False)
    a, b = want.to_pandas(), got.to_pandas()
    assert list(a.method) == list(b.method) and list(a.tokens) == list(b.tokens)
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=1e-9, err_msg=col)
    assert got.meta["model"]["fingerprint"] == want.meta["model"]["fingerprint"]
    assert got.meta["workload"]["fingerprint"] == want.meta["workload"]["fingerprint"]
    # and the ordinary scorer reads the streaming trace unchanged
    plain = score(tiny_gpt_oss_dir, stream, workload, tmp_path / "c", methods=LOCAL[:3], bootstrap=50, progress=False)
    c = plain.to_pandas()
    np.testing.assert_allclose(c.value, a.value[: len(c)], rtol=1e-4)


def test_score_streaming_refuses_whole_model_methods(traces, tiny_gpt_oss_dir, tmp_path):
    with pytest.raises(UspxError, match="whole model"):
        score_streaming(tiny_gpt_oss_dir, traces[1], tmp_path / "s", ["frequency", "taylor"], progress=False)


def test_killed_streaming_trace_resumes_to_same_result(mxfp4_dir, workload, tmp_path, monkeypatch):
    kw = dict(norms=True, reconstruction=True, dtype="fp32", split="calibration", progress=False, streaming=True,
              items_per_shard=4)  # several shards
    trace(mxfp4_dir, workload, tmp_path / "ref", **kw)
    real = folder.stream_trace

    def killed_after_layer_1(*args, after_layer, **kwargs):
        def after(i, store):
            after_layer(i, store)
            if i == 1:
                raise KeyboardInterrupt  # as if killed once layer 1 was saved
        return real(*args, after_layer=after, **kwargs)

    monkeypatch.setattr(folder, "stream_trace", killed_after_layer_1)
    with pytest.raises(KeyboardInterrupt):
        trace(mxfp4_dir, workload, tmp_path / "run", **kw)
    state = json.loads((tmp_path / "run" / folder.STAGING / "state.json").read_text())
    assert state["layers_done"] == 2
    monkeypatch.setattr(folder, "stream_trace", real)
    manifest = trace(mxfp4_dir, workload, tmp_path / "run", **kw)
    assert manifest["streaming"]["first_layer"] == 2  # layers 0 and 1 were not run again
    _assert_same_trace(tmp_path / "ref", tmp_path / "run")
    a, b = (np.load(tmp_path / d / folder.RECONSTRUCTION) for d in ("ref", "run"))
    np.testing.assert_allclose(b["err"], a["err"], rtol=1e-5)


def test_extract_streaming_mxfp4(mxfp4_dir, workload, tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from uspx.extract import extract

    out = tmp_path / "run"
    report = extract(mxfp4_dir, workload, out, keep="50%", method="reconstruction", streaming=True, dtype="fp32",
                     progress=False)
    kept = {int(k): v for k, v in report["kept"].items()}
    assert set(report["counts"].values()) == {4}
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["quantization_config"]["quant_method"] == "mxfp4"
    size = report["size"]
    assert size["within_tolerance"] and abs(size["relative_error"]) <= 0.02
    assert size["actual_bytes"] < size["source_tensor_bytes"]
    ver = report["verification"]
    assert ver["max_abs_logit_diff"] <= 1e-4 and ver["expert_tensors_identical"]
    assert set(report["evaluation"]["families"]) == {"code", "prose", "all"}

    # stock transformers loads the pruned MXFP4 folder and it equals the original restricted
    load = lambda p: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        p, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)).eval()
    original, pruned = load(mxfp4_dir), load(out / "model")
    ids = torch.tensor([[5, 17, 40, 3, 99, 21, 8, 64]])
    with torch.no_grad(), adapter_for(original).restrict(kept):
        want = original(ids, use_cache=False).logits
    with torch.no_grad():
        got = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_plan_streaming_cli(tmp_path):
    from uspx.models.synthetic import gpt_oss_config

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(gpt_oss_config("20b")))  # the config alone
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "m"), "--streaming", "--tokens", "2048", "--seq-len", "256",
                                   "-o", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert 3 * 2**30 < plan["total"] < 4 * 2**30  # one bf16 layer of gpt-oss-20b plus 2048 tokens
    assert plan["whole_model_bytes"] > 35 * 2**30  # what loading it dequantized would need


def test_restricted_stream_never_reads_banned_experts(mxfp4_dir, monkeypatch):
    """A restricted run decodes only the kept experts; the other rows stay unwritten (never resident).
    Filling them with NaN must not change the logits: grouped_mm never reads an expert without tokens."""
    import uspx.stream.layer as layer_mod
    from uspx.stream.verify import stream_logits

    kept = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6], 2: [0, 1, 4, 5], 3: [3, 4, 6, 7]}
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [11, 12, 13]]
    want = stream_logits(mxfp4_dir, seqs, kept=kept, dtype=torch.float32)
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(layer_mod.torch, "empty", nan_empty)
    got = stream_logits(mxfp4_dir, seqs, kept=kept, dtype=torch.float32)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)



def test_cli_prune_keeps_mxfp4_and_matches_restricted_original(tmp_path):
    """`uspx prune` on an MXFP4 checkpoint: sliced blocks, stock-loadable, same logits as a ban by hand."""
    import json as _json

    import torch as _torch
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from typer.testing import CliRunner

    from uspx.cli import app
    from uspx.models.synthetic import write_gpt_oss
    from uspx.plan import select_experts

    src = tmp_path / "mx"
    write_gpt_oss(src, "tiny", seed=1)
    cfg = _json.loads((src / "config.json").read_text())
    rows = [dict(layer=l, expert=e, value=float((l * 7 + e * 3) % 11), cost_bytes=1)
            for l in range(cfg["num_hidden_layers"]) for e in range(cfg["num_local_experts"])]
    select_experts(rows, keep="50%", config=src, dtype="mxfp4").save(tmp_path / "plan.json")
    kept = {int(k): v for k, v in _json.loads((tmp_path / "plan.json").read_text())["kept"].items()}

    res = CliRunner().invoke(app, ["prune", str(src), str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out_cfg = _json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["quantization_config"]["quant_method"] == "mxfp4" and out_cfg["num_local_experts"] == 4
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size

    load = dict(quantization_config=Mxfp4Config(dequantize=True), dtype=_torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **load).eval()
    original = AutoModelForCausalLM.from_pretrained(src, **load).eval()
    with _torch.no_grad():
        for l, layer in enumerate(original.model.layers):
            banned = [e for e in range(cfg["num_local_experts"]) if e not in kept[l]]
            layer.mlp.router.bias[banned] = float("-inf")
        ids = _torch.arange(3, 40)[None]
        assert _torch.allclose(pruned(ids).logits, original(ids).logits, atol=1e-4)
