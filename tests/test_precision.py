"""Precision and placement: a model computes in its checkpoint's stored float type unless told
otherwise, the same whether it is loaded whole or run a decoder layer at a time, and a streamed
layer can be moved to a GPU for its turn.

The references are transformers' own models loaded from the same folder (``dtype="auto"``: the
config's precision) and run one item at a time, without padding."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import gpu_growth, make_tokenizer, save_tiny, write_jsonl
from uspx.cli import app
from uspx.engine import FromCheckpoint, compute_dtype, open_source
from uspx.io import UspxError
from uspx.models import load_model, supported_families
from uspx.models.loading import parse_dtype, stored_dtype
from uspx.models.synthetic import write_gpt_oss
from uspx.testing import TINY_CONFIGS, tiny_model
from uspx.trace import trace

ROWS = [{"prompt": f"def {'abcdefgh'[i]}(x):", "completion": f" return x*{i}", "family": "code" if i % 2 else "prose"}
        for i in range(8)]
FLOATS = ("expert_weights", "router_logits", "expert_norms")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("wl") / "w.jsonl", ROWS)


def _rows(folder) -> pd.DataFrame:
    manifest = json.loads((folder / "manifest.json").read_text())
    table = pd.concat([pq.read_table(folder / s["file"]).to_pandas() for s in manifest["shards"]])
    return table.sort_values(["sample", "layer", "position"]).reset_index(drop=True)


def _column(rows: pd.DataFrame, name: str) -> np.ndarray:
    return np.stack(rows[name].to_numpy())


def _reference_logits(src, rows: pd.DataFrame, **load) -> dict[tuple[int, int], np.ndarray]:
    """(item, MoE layer) -> router logits [T, E] of transformers' own model, one item at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", **load).eval()
    layers = sorted(rows.layer.unique())
    out = {}
    for sample, g in rows.groupby("sample"):
        ids = torch.tensor([g[g.layer == layers[0]].token_id.tolist()])
        with torch.no_grad():
            logits = model(ids, output_router_logits=True, use_cache=False).router_logits
        assert len(logits) == len(layers)
        for layer, l in zip(layers, logits):
            out[sample, layer] = l.float().numpy()
    return out


def _assert_matches_reference(rows: pd.DataFrame, reference: dict, tol: float) -> None:
    for (sample, layer), want in reference.items():
        got = _column(rows[(rows["sample"] == sample) & (rows.layer == layer)], "router_logits")
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"item {sample} layer {layer}")


def test_every_supported_family_has_a_tiny_config():
    assert sorted(TINY_CONFIGS) == supported_families()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_default_streamed_trace_equals_whole_model_trace(family, workload, tmp_path, one_thread):
    """No precision flag on either side: an fp32 checkpoint is traced in fp32 both ways."""
    src = save_tiny(family, tmp_path / "src")
    kw = dict(logits=True, norms=True, progress=False)
    trace(src, workload, tmp_path / "whole", **kw)
    manifest = trace(open_source(src, streaming=True), workload, tmp_path / "stream", **kw)
    assert manifest["options"]["dtype"] == "fp32"
    whole, stream = _rows(tmp_path / "whole"), _rows(tmp_path / "stream")
    assert whole[["sample", "layer", "position", "token_id"]].equals(stream[["sample", "layer", "position", "token_id"]])
    np.testing.assert_array_equal(_column(stream, "expert_ids"), _column(whole, "expert_ids"))
    for name in FLOATS:
        np.testing.assert_allclose(_column(stream, name), _column(whole, name), rtol=1e-5, atol=1e-5, err_msg=name)
    _assert_matches_reference(stream, _reference_logits(src, stream), tol=1e-4)


def _bf16_checkpoint(family: str, path):
    if family == "gpt_oss_mxfp4":  # MXFP4 experts, the rest stored in bf16 (the released layout)
        write_gpt_oss(path, "tiny")
    else:
        tiny_model(family).to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss_mxfp4"])
def test_bf16_checkpoint_is_traced_in_bf16_by_both_paths(family, workload, tmp_path, one_thread):
    from transformers import Mxfp4Config

    src = _bf16_checkpoint(family, tmp_path / "src")
    assert stored_dtype(src) == torch.bfloat16
    assert open_source(src).dtype == torch.bfloat16
    assert open_source(src, streaming=True).dtype == torch.bfloat16
    kw = dict(logits=True, norms=True, progress=False)
    trace(src, workload, tmp_path / "whole", **kw)
    assert trace(open_source(src, streaming=True), workload, tmp_path / "stream", **kw)["options"]["dtype"] == "bf16"
    trace(src, workload, tmp_path / "fp32", dtype="fp32", **kw)
    whole, stream, fp32 = (_rows(tmp_path / d) for d in ("whole", "stream", "fp32"))
    np.testing.assert_array_equal(_column(stream, "expert_ids"), _column(whole, "expert_ids"))
    for name in FLOATS:
        np.testing.assert_allclose(_column(stream, name), _column(whole, name), rtol=1e-2, atol=1e-2, err_msg=name)
    load = dict(quantization_config=Mxfp4Config(dequantize=True)) if family == "gpt_oss_mxfp4" else {}
    reference = _reference_logits(src, stream, **load)
    assert next(iter(reference.values())).dtype == np.float32  # cast for comparison only
    _assert_matches_reference(stream, reference, tol=2e-2)
    _assert_matches_reference(whole, reference, tol=2e-2)
    # the same weights computed in fp32 route measurably differently: the default did not compute in fp32
    assert np.abs(_column(fp32, "router_logits") - _column(whole, "router_logits")).max() > 0.05


def test_stored_dtype_reads_the_weight_files(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tiny_model("mixtral").to(dtype).save_pretrained(tmp_path / str(dtype))
        assert stored_dtype(tmp_path / str(dtype)) == dtype
        assert load_model(tmp_path / str(dtype), dtype="auto", with_tokenizer=False).model.dtype == dtype
        assert FromCheckpoint(tmp_path / str(dtype)).dtype == dtype
    # a config alone says it in its dtype field; MXFP4 experts decode to bf16; nothing said: bf16
    (tmp_path / "cfg").mkdir()
    for config, want in (({"dtype": "float32"}, torch.float32), ({"torch_dtype": "float16"}, torch.float16),
                         ({"dtype": "float32", "quantization_config": {"quant_method": "mxfp4"}}, torch.bfloat16),
                         ({}, torch.bfloat16)):
        (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
        assert stored_dtype(tmp_path / "cfg") == want, config


def test_explicit_dtype_overrides_the_checkpoint(tmp_path):
    src = save_tiny("qwen3_moe", tmp_path / "src")
    assert open_source(src, dtype="bf16").dtype == torch.bfloat16
    assert open_source(src, streaming=True, dtype="fp16").dtype == torch.float16
    assert compute_dtype("auto") is None and compute_dtype("auto", src) == torch.float32
    assert compute_dtype("bfloat16") == torch.bfloat16 and parse_dtype(torch.float16) == torch.float16
    for bad in ("fp8", "int4", torch.float64):
        with pytest.raises(UspxError, match="auto, bf16, fp16, fp32"):
            open_source(src, dtype=bad)


def test_cli_dtype_spellings(tmp_path, workload):
    """``--dtype`` and the older ``--compute-dtype`` are one option; ``uspx plan --dtype`` still sizes."""
    src = save_tiny("mixtral", tmp_path / "src")
    for flag in ("--dtype", "--compute-dtype"):
        out = tmp_path / flag.strip("-")
        res = CliRunner().invoke(app, ["trace", str(src), str(workload), "-o", str(out), "--streaming", flag, "bf16"])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "manifest.json").read_text())["options"]["dtype"] == "bf16"
    res = CliRunner().invoke(app, ["trace", str(src), str(workload), "-o", str(tmp_path / "bad"), "--dtype", "fp64"])
    assert res.exit_code != 0 and "fp64" in str(res.exception) and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(app, ["plan", str(src), "--dtype", "fp16", "-o", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_without_cuda_is_refused_before_any_work(tmp_path, workload):
    src = save_tiny("mixtral", tmp_path / "src")
    with pytest.raises(UspxError, match="cuda"):
        trace(open_source(src, streaming=True, device="cuda"), workload, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(UspxError, match="cuda"):
        trace(src, workload, tmp_path / "t", device="cuda:0", progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(UspxError, match="not a device"):
        FromCheckpoint(src, device="gpu7")
    # every command that runs the model takes --device and refuses it here before writing anything
    from typer.testing import CliRunner

    from uspx.cli import app

    trace(src, workload, tmp_path / "tr", progress=False)
    for args in (["trace", str(src), str(workload), "-o", str(tmp_path / "c")],
                 ["score", str(src), str(tmp_path / "tr"), str(workload), "-o", str(tmp_path / "c")],
                 ["extract", str(src), str(workload), "--keep", "50%", "-o", str(tmp_path / "c")],
                 ["eval", str(src), str(workload), "--teacher", str(src), "-o", str(tmp_path / "c")]):
        res = CliRunner().invoke(app, [*args, "--streaming", "--device", "cuda"])
        assert res.exit_code != 0 and "no CUDA GPU" in str(res.exception), args[0]
        assert not (tmp_path / "c").exists(), args[0]


@cuda
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v3", "jamba"])
def test_streamed_layers_on_cuda_equal_cpu(family, workload, tmp_path):
    src = save_tiny(family, tmp_path / "src")
    kw = dict(logits=True, norms=True, reconstruction=True, progress=False)
    trace(open_source(src, streaming=True), workload, tmp_path / "cpu", **kw)
    gpu_run = lambda: trace(open_source(src, streaming=True, device="cuda"), workload,  # noqa: E731
                            tmp_path / f"gpu-{len(list(tmp_path.glob('gpu-*')))}", **kw)
    assert gpu_growth(gpu_run) == 0  # every layer went back off the GPU
    cpu, gpu = _rows(tmp_path / "cpu"), _rows(tmp_path / "gpu-1")
    np.testing.assert_array_equal(_column(gpu, "expert_ids"), _column(cpu, "expert_ids"))
    for name in FLOATS:
        np.testing.assert_allclose(_column(gpu, name), _column(cpu, name), rtol=1e-3, atol=1e-3, err_msg=name)


@cuda
def test_whole_model_on_cuda_equals_streamed_on_cuda(workload, tmp_path):
    src = save_tiny("mixtral", tmp_path / "src")
    kw = dict(logits=True, norms=True, progress=False, device="cuda")
    trace(src, workload, tmp_path / "whole", **kw)
    trace(open_source(src, streaming=True, device="cuda"), workload, tmp_path / "stream", **kw)
    whole, stream = _rows(tmp_path / "whole"), _rows(tmp_path / "stream")
    np.testing.assert_array_equal(_column(stream, "expert_ids"), _column(whole, "expert_ids"))
    np.testing.assert_allclose(_column(stream, "router_logits"), _column(whole, "router_logits"), rtol=1e-3, atol=1e-3)
