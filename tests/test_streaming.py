"""Every stage run a decoder layer at a time (``--streaming``) gives what the whole-model run gives,
for every family and with the default precision on both sides: trace folders, local scores, exports
sliced on disk (MXFP4 stays MXFP4) and their enforced verification, evaluation; a killed
layer-by-layer trace resumes to the same result."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tokenizer, save_tiny, write_jsonl
from uspx.cli import app
from uspx.engine import open_source
from uspx.io import UspxError
from uspx.models import adapter_for, load_model
from uspx.models.synthetic import write_gpt_oss
from uspx.prune import export
from uspx.score import score
from uspx.testing import TINY_CONFIGS
from uspx.trace import Trace, trace
from uspx.trace.run import RECONSTRUCTION, STAGING

FLOATS = ("expert_weights", "router_logits", "expert_norms")
LOCAL = ["frequency", "reap", "ean", "reconstruction"]
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
    """The same workload traced whole and layer by layer (through the CLI)."""
    root = tmp_path_factory.mktemp("traces")
    whole = trace(tiny_gpt_oss_dir, workload, root / "whole", logits=True, norms=True, progress=False)
    res = CliRunner().invoke(app, ["trace", str(tiny_gpt_oss_dir), str(workload), "-o", str(root / "stream"),
                                   "--logits", "--norms", "--streaming", "--reconstruction"])  # default precision: the checkpoint's fp32
    assert res.exit_code == 0, res.output
    return root / "whole", root / "stream", whole


def _assert_same_trace(a, b, tol=1e-4):
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["format"] == mb["format"] and ma["model"] == mb["model"] and ma["workload"] == mb["workload"]
    assert {k: v for k, v in mb["options"].items() if k in ma["options"]} == ma["options"]
    assert [s["file"] for s in ma["shards"]] == [s["file"] for s in mb["shards"]] and mb["complete"]
    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))
    for s in ma["shards"]:
        ta, tb = pq.read_table(a / s["file"]), pq.read_table(b / s["file"])
        assert ta.schema == tb.schema
        for col in ta.column_names:
            if col in FLOATS:
                np.testing.assert_allclose(np.array(tb.column(col).to_pylist()), np.array(ta.column(col).to_pylist()),
                                           rtol=tol, atol=tol, err_msg=col)
            else:
                assert tb.column(col).to_pylist() == ta.column(col).to_pylist(), col


def test_streaming_trace_folder_equals_whole_model(traces):
    whole, stream, _ = traces
    _assert_same_trace(whole, stream)
    assert json.loads((stream / "manifest.json").read_text())["options"]["streaming"] is True
    assert Trace(stream).moe_layers == Trace(whole).moe_layers  # the ordinary reader takes it
    assert (stream / RECONSTRUCTION).exists() and not (stream / STAGING).exists()


def test_streaming_local_scores_equal_whole_model(traces, tiny_gpt_oss_dir, workload, tmp_path):
    whole, stream, _ = traces
    want = score(tiny_gpt_oss_dir, whole, workload, tmp_path / "a", methods=LOCAL, bootstrap=50, progress=False)
    got = score(open_source(tiny_gpt_oss_dir, streaming=True), stream, workload, tmp_path / "b", methods=LOCAL,
                bootstrap=50, progress=False)
    a, b = want.to_pandas(), got.to_pandas()
    assert list(a.method) == list(b.method) and list(a.tokens) == list(b.tokens)
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=1e-9, err_msg=col)
    assert got.meta["model"]["fingerprint"] == want.meta["model"]["fingerprint"]
    assert got.meta["method_source"]["reconstruction"] == "trace"  # the streamed trace recorded its sums


def test_streaming_score_refuses_whole_model_methods_before_any_work(traces, tiny_gpt_oss_dir, workload, tmp_path):
    with pytest.raises(UspxError, match="whole model"):
        score(open_source(tiny_gpt_oss_dir, streaming=True), traces[1], workload, tmp_path / "s",
              ["frequency", "taylor"], progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_traces_scores_and_exports_layer_by_layer(family, workload, tmp_path, one_thread):
    src = save_tiny(family, tmp_path / "src")
    kw = dict(split="calibration", norms=True, reconstruction=True, progress=False)
    trace(src, workload, tmp_path / "whole", **kw)
    trace(open_source(src, streaming=True), workload, tmp_path / "stream", **kw)  # default precision on both sides
    _assert_same_trace(tmp_path / "whole", tmp_path / "stream")
    a = np.load(tmp_path / "whole" / RECONSTRUCTION)
    b = np.load(tmp_path / "stream" / RECONSTRUCTION)
    np.testing.assert_allclose(b["err"], a["err"], rtol=1e-4, atol=1e-9)
    assert (b["routed"] == a["routed"]).all()

    # an export sliced on disk, verified layer by layer, equals the original restricted to the kept set
    layers = adapter_for(load_model(src, with_tokenizer=False).model).layers
    kept = {l.index: [0, 1, 4, 5] for l in layers}  # two per group of four: deepseek's groups stay equal
    record = export(open_source(src, streaming=True), kept, tmp_path / "out")
    assert record["verification"]["max_abs_logit_diff"] <= 1e-4
    assert "layer by layer" in record["verification"]["reloaded_with"]
    original = load_model(src, with_tokenizer=False).model
    pruned = load_model(tmp_path / "out", with_tokenizer=False).model
    assert adapter_for(pruned).num_experts == 4
    ids = torch.tensor([[5, 17, 40, 3, 99, 21, 8, 64]])
    with torch.no_grad(), adapter_for(original).restrict(kept):
        want = original(ids, use_cache=False).logits
    with torch.no_grad():
        got = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_killed_streaming_trace_resumes_to_same_result(mxfp4_dir, workload, tmp_path, monkeypatch):
    import uspx.engine.runner as runner

    kw = dict(split="calibration", norms=True, reconstruction=True, progress=False, items_per_shard=4)  # several shards
    layered = lambda: open_source(mxfp4_dir, streaming=True, dtype="fp32")  # noqa: E731
    trace(layered(), workload, tmp_path / "ref", **kw)
    real = runner._save_state

    def killed_after_layer_1(state_dir, key, done, store, save_hidden):
        real(state_dir, key, done, store, save_hidden)
        if done == 2:
            raise KeyboardInterrupt  # as if killed once layer 1 was saved

    monkeypatch.setattr(runner, "_save_state", killed_after_layer_1)
    with pytest.raises(KeyboardInterrupt):
        trace(layered(), workload, tmp_path / "run", **kw)
    assert json.loads((tmp_path / "run" / STAGING / "state.json").read_text())["layers_done"] == 2
    monkeypatch.setattr(runner, "_save_state", real)
    manifest = trace(layered(), workload, tmp_path / "run", **kw)
    assert manifest["streaming"]["first_layer"] == 2  # layers 0 and 1 were not run again
    _assert_same_trace(tmp_path / "ref", tmp_path / "run")
    a, b = (np.load(tmp_path / d / RECONSTRUCTION) for d in ("ref", "run"))
    np.testing.assert_allclose(b["err"], a["err"], rtol=1e-5)


def test_extract_streaming_mxfp4(mxfp4_dir, workload, tmp_path):
    from uspx.engine.checkpoint import Checkpoint
    from uspx.extract import extract

    out = tmp_path / "run"
    report = extract(open_source(mxfp4_dir, streaming=True, dtype="fp32"), workload, out, keep="50%",
                     method="reconstruction", dtype="fp32", progress=False)
    kept = {int(k): v for k, v in report["kept"].items()}
    assert set(report["counts"].values()) == {4} and report["streaming"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["quantization_config"]["quant_method"] == "mxfp4"
    size = report["size"]
    assert abs(size["relative_error"]) <= 0.02 and size["actual_bytes"] < size["source_tensor_bytes"]
    assert report["verification"]["max_abs_logit_diff"] <= 1e-4
    assert set(report["quality"]) == {"code", "prose"} and report["acceptance"]["verdict"] in ("pass", "fail")
    record = json.loads((out / "model" / "uspx_export.json").read_text())
    assert record["format"] == "uspx-export/1" and record["dtype"] == "mxfp4"
    assert not (out / "model" / "uspx-prune.json").exists()
    # the kept experts' bytes are the original's, sliced, not requantized
    src, dst = Checkpoint(mxfp4_dir), Checkpoint(out / "model")
    for name in ("model.layers.2.mlp.experts.gate_up_proj_blocks", "model.layers.2.mlp.experts.down_proj_scales",
                 "model.layers.2.mlp.router.bias"):
        assert torch.equal(dst.get(name), src.get(name)[kept[2]])


def test_extract_streaming_fails_on_a_corrupted_expert_byte(mxfp4_dir, workload, tmp_path, monkeypatch):
    import uspx.prune.slicing as slicing
    from uspx.extract import extract

    real = slicing.write_safetensors

    def corrupting(path, specs, produce, *a, **k):
        def bad(spec):
            for chunk in produce(spec):
                if spec.name.endswith("layers.1.mlp.experts.down_proj_blocks"):
                    chunk = chunk.clone()
                    chunk.view(-1)[:64] ^= 0x77
                yield chunk
        return real(path, specs, bad, *a, **k)

    monkeypatch.setattr(slicing, "write_safetensors", corrupting)
    with pytest.raises(UspxError, match="verification failed"):
        extract(open_source(mxfp4_dir, streaming=True, dtype="fp32"), workload, tmp_path / "run", keep="50%",
                method="frequency", dtype="fp32", progress=False)
    assert not (tmp_path / "run" / "model").exists()


def test_extract_validates_arguments_before_any_work(tiny_gpt_oss_dir, workload, tmp_path):
    from uspx.extract import extract

    layered = open_source(tiny_gpt_oss_dir, streaming=True)
    for model, kw, match in ((tiny_gpt_oss_dir, dict(keep="half"), "keep must be"),
                             (tiny_gpt_oss_dir, dict(budget="8 parsecs"), "size"),
                             (tiny_gpt_oss_dir, dict(keep="50%", method="magic"), "unknown score method"),
                             (layered, dict(keep="half"), "keep must be"),
                             (layered, dict(keep="50%", method="taylor"), "whole model")):
        with pytest.raises(UspxError, match=match):
            extract(model, workload, tmp_path / "run", progress=False, **kw)
        assert not (tmp_path / "run").exists()


def test_cli_score_select_prune_layer_by_layer(traces, tiny_gpt_oss_dir, workload, tmp_path):
    """`uspx score --streaming` scores the layer-by-layer trace like the library does whole, and
    `uspx prune --streaming` verifies its export layer by layer; the export equals the original
    restricted to the plan's experts (transformers' own forwards)."""
    whole, stream, _ = traces

    def run(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output

    run("score", tiny_gpt_oss_dir, stream, workload, "-o", tmp_path / "s", "--streaming", "--bootstrap", 20,
        "--methods", "frequency,reap")
    want = score(tiny_gpt_oss_dir, whole, workload, tmp_path / "w", methods=["frequency", "reap"], bootstrap=20,
                 progress=False).to_pandas()
    got = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert got["options"]["streaming"] and got["options"]["dtype"] == "fp32"
    np.testing.assert_allclose(pq.read_table(tmp_path / "s" / "scores.parquet").to_pandas().value, want.value,
                               rtol=1e-4, atol=1e-9)
    run("select", tmp_path / "s", "--model", tiny_gpt_oss_dir, "--method", "reap", "--keep", "50%",
        "-o", tmp_path / "plan.json")
    run("prune", tiny_gpt_oss_dir, tmp_path / "plan.json", "-o", tmp_path / "m", "--streaming")
    record = json.loads((tmp_path / "m" / "uspx_export.json").read_text())
    assert "layer by layer" in record["verification"]["reloaded_with"]
    kept = {int(l): v for l, v in json.loads((tmp_path / "plan.json").read_text())["kept"].items()}
    original = load_model(tiny_gpt_oss_dir, with_tokenizer=False).model
    pruned = load_model(tmp_path / "m", with_tokenizer=False).model
    ids = torch.tensor([[5, 17, 40, 3, 99, 21, 8, 64]])
    with torch.no_grad(), adapter_for(original).restrict(kept):
        expected = original(ids, use_cache=False).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", ["gpt_oss_20b", "qwen3_30b"])
def test_plan_streaming_cli(config, tmp_path):
    from uspx.models.synthetic import gpt_oss_config

    cfg = gpt_oss_config("20b") if config == "gpt_oss_20b" else dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))  # the config alone
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "m"), "--streaming", "--tokens", "2048", "--seq-len", "256",
                                   "-o", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert 2 * 2**30 < plan["total"] < 5 * 2**30  # one bf16 layer plus 2048 tokens
    assert plan["whole_model_bytes"] > 35 * 2**30  # what loading the whole model in bf16 would need


def test_cli_prune_keeps_mxfp4_refuses_an_occupied_folder(mxfp4_dir, tmp_path):
    from uspx.plan import select_experts

    cfg = json.loads((mxfp4_dir / "config.json").read_text())
    rows = [dict(layer=l, expert=e, value=float((l * 7 + e * 3) % 11), cost_bytes=1)
            for l in range(cfg["num_hidden_layers"]) for e in range(cfg["num_local_experts"])]
    select_experts(rows, keep="50%", config=mxfp4_dir, dtype="mxfp4").save(tmp_path / "plan.json")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    res = CliRunner().invoke(app, ["prune", str(mxfp4_dir), str(tmp_path / "plan.json"), "-o", str(mine)])
    assert res.exit_code != 0 and (mine / "thesis.txt").read_text() == "years of work"
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    res = CliRunner().invoke(app, ["prune", str(mxfp4_dir), str(tmp_path / "plan.json"), "-o", str(tmp_path / "out"),
                                   "--streaming"])
    assert res.exit_code == 0, res.output
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["quantization_config"]["quant_method"] == "mxfp4" and out_cfg["num_local_experts"] == 4


def test_sequential_calibration_scores_each_layer_after_pruning_the_ones_before(tmp_path, workload, one_thread):
    from uspx.engine import InMemory
    from uspx.score.reconstruction import reconstruction_sums
    from uspx.workload import encode, load_workload

    src = save_tiny("mixtral", tmp_path / "src")
    trace(src, workload, tmp_path / "t", split="calibration", norms=True, progress=False)
    one = score(src, tmp_path / "t", workload, tmp_path / "a", methods=["reconstruction", "reap"], bootstrap=0,
                progress=False).to_pandas()
    # keeping every expert prunes nothing: the sequential pass gives the one-pass scores
    same = score(src, tmp_path / "t", workload, tmp_path / "b", methods=["reconstruction", "reap"], bootstrap=0,
                 progress=False, sequential=8).to_pandas()
    np.testing.assert_allclose(same.value, one.value, rtol=1e-5, atol=1e-9)
    # keeping 3: layer 0 is scored as before; layer 1 as the model with layer 0 restricted computes it
    seq = score(src, tmp_path / "t", workload, tmp_path / "c", methods=["reconstruction"], bootstrap=0,
                progress=False, sequential=3)
    kept0 = seq.meta["options"]["sequential"]["kept"]["reconstruction"]["0"]
    top0 = one[(one.method == "reconstruction") & (one.layer == 0)].sort_values(["value", "expert"], ascending=[False, True])
    assert kept0 == sorted(top0.expert[:3].tolist())
    got = seq.to_pandas()
    np.testing.assert_allclose(got[got.layer == 0].value, one[(one.method == "reconstruction") & (one.layer == 0)].value,
                               rtol=1e-5)
    lm = load_model(src)
    items = [e for e in encode(load_workload(workload).part("calibration"), lm.tokenizer, 2048)]
    with adapter_for(lm.model).restrict({0: kept0}):
        err, _ = reconstruction_sums(InMemory(lm.model), items, pad_id=0, progress=False)
    tokens = sum(len(e.input_ids) for e in items)
    np.testing.assert_allclose(got[got.layer == 1].value, err[:, 1].sum(0) / tokens, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_layer_by_layer_eval_reports_what_the_whole_model_eval_does(family, workload, tmp_path, one_thread):
    """Loss, agreement and KL of a restricted candidate (and, for two families, of an exported one),
    whole and layer by layer with default flags on both sides: equal to 1e-4, KL included."""
    from uspx.engine import open_source
    from uspx.evaluate import evaluate

    folder = save_tiny(family, tmp_path / family)
    adapter = adapter_for(load_model(folder).model)
    kept = {l.index: list(range(0, l.num_experts, 2)) for l in adapter.layers}
    candidates = [(None, kept)]
    if family in ("qwen3_moe", "gpt_oss"):
        export(folder, kept, tmp_path / "pruned")
        candidates.append((tmp_path / "pruned", None))
    for candidate, restrict in candidates:
        whole = evaluate(folder, candidate, workload, kept=restrict, speed=False, split="calibration")
        layered = evaluate(open_source(folder, streaming=True), candidate, workload, kept=restrict, speed=False,
                           split="calibration")
        assert layered["settings"]["streaming"] and not whole["settings"]["streaming"]
        for fam, row in whole["families"].items():
            other = layered["families"][fam]
            assert row["kl"] is not None and row["kl"] > 0  # the restriction changes the predictions
            for key in ("loss_teacher", "loss_candidate", "delta", "top1_agreement", "kl"):
                assert other[key] == pytest.approx(row[key], abs=1e-4), (fam, key)
