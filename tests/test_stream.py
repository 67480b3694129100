"""Streaming gpt_oss layer by layer from safetensors equals the whole model; MXFP4 checkpoints
written by synthetic.py load with stock transformers; pruning on disk equals restriction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.models.synthetic import checkpoint_bytes, gpt_oss_config, tensor_specs, write_gpt_oss
from uspx.stream import Checkpoint, predict_peak_memory, prune_mxfp4_checkpoint, pruned_bytes, stream_trace
from uspx.testing import tiny_model

TOL = dict(rtol=1e-4, atol=1e-4)
KEPT = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6], 2: [0, 1, 4, 5], 3: [3, 4, 6, 7]}


def _load(path, dtype=torch.float32):
    """Stock from_pretrained. MXFP4 on CPU: without kernels transformers dequantizes, but its
    environment check wants `accelerate` unless dequantize=True is asked for explicitly."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    cfg = json.loads((path / "config.json").read_text())
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if "quantization_config" in cfg else {}
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    # a small shard limit so the tiny checkpoint is sharded like the real one
    return write_gpt_oss(tmp_path_factory.mktemp("mxfp4") / "tiny", "tiny", max_shard_bytes=200_000)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "tiny"
    tiny_model("gpt_oss").save_pretrained(path)
    return path


def _sequences(vocab: int, lengths=(20, 20, 13, 1, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _whole_model_routing(model, sequences) -> dict[int, dict[str, np.ndarray]]:
    """Routing and expert-output norms from the ordinary whole-model forward (router hooks)."""
    adapter = adapter_for(model)
    cap: dict = {}
    handles = []
    for layer in adapter.layers:
        def on_router(mod, args, out, i=layer.index):
            cap.setdefault(i, []).append([t.detach().float().clone() for t in out])

        def on_experts(mod, args, out, layer=layer):
            norms = adapter.expert_outputs(layer, args[0], args[1]).float().norm(dim=-1)
            cap.setdefault(("norms", layer.index), []).append(norms)

        handles += [layer.router.register_forward_hook(on_router), layer.experts.register_forward_hook(on_experts)]
    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]), use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for layer in adapter.layers:
        parts = cap[layer.index]
        out[layer.index] = {
            "router_logits": torch.cat([p[0] for p in parts]).numpy(),
            "expert_weights": torch.cat([p[1] for p in parts]).numpy(),
            "expert_ids": torch.cat([p[2] for p in parts]).long().numpy(),
            "expert_norms": torch.cat(cap[("norms", layer.index)]).numpy(),
        }
    return out


def _stream(path, sequences, **kw) -> dict[int, dict[str, np.ndarray]]:
    got: dict = {}
    stream_trace(path, sequences, lambda i, r: got.__setitem__(i, {k: v.copy() for k, v in r.items()}),
                 dtype=torch.float32, progress=False, **kw)
    return got


def _assert_same(ref, got):
    assert sorted(ref) == sorted(got)
    for i in ref:
        np.testing.assert_array_equal(got[i]["expert_ids"], ref[i]["expert_ids"], err_msg=f"layer {i}")
        for key in ("expert_weights", "router_logits", "expert_norms"):
            np.testing.assert_allclose(got[i][key], ref[i][key], **TOL, err_msg=f"layer {i} {key}")


# ----- synthetic checkpoints ------------------------------------------------------------------
def test_synthetic_layout_matches_transformers_gpt_oss():
    """Names and shapes are those transformers' model expects; MXFP4 pairs replace the experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for scale in ("tiny", "20b"):
        cfg = gpt_oss_config(scale)
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "quantization_config"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        expected = {}
        for name, t in model.state_dict().items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                e, k, rows = t.shape  # parameter [E, K, rows] is stored as blocks [E, rows, K/32, 16]
                expected[name + "_blocks"] = (e, rows, k // 32, 16)
                expected[name + "_scales"] = (e, rows, k // 32)
            else:
                expected[name] = tuple(t.shape)
        assert {s.name: s.shape for s in tensor_specs(cfg)} == expected
    cfg = gpt_oss_config("20b")
    assert cfg["num_hidden_layers"] == 24 and cfg["num_local_experts"] == 32 and cfg["vocab_size"] == 201088
    assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert 12.7 < checkpoint_bytes(cfg) / 2**30 < 12.9  # the published checkpoint is 12.8 GiB


def test_mxfp4_checkpoint_loads_with_stock_transformers(mxfp4_dir):
    ckpt = Checkpoint(mxfp4_dir)
    assert len(ckpt.files()) > 1 and (mxfp4_dir / "model.safetensors.index.json").exists()
    spec = ckpt.spec("model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert spec.dtype == torch.uint8 and spec.shape == (8, 128, 2, 16)
    assert ckpt.spec("model.layers.0.mlp.experts.down_proj_bias").dtype == torch.bfloat16
    model = _load(mxfp4_dir)
    from uspx.models.mxfp4 import decode

    want = decode(ckpt.get("model.layers.1.mlp.experts.down_proj_blocks"),
                  ckpt.get("model.layers.1.mlp.experts.down_proj_scales"), torch.float32)
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj.detach(), want)


# ----- streaming ------------------------------------------------------------------------------
def test_stream_equals_whole_model_mxfp4(mxfp4_dir):
    seqs = _sequences(256)
    ref = _whole_model_routing(_load(mxfp4_dir), seqs)
    _assert_same(ref, _stream(mxfp4_dir, seqs, batch_tokens=40))


def test_stream_equals_whole_model_mxfp4_bf16(mxfp4_dir):
    # the model's own dtype: same kernels on the same rows, so routing matches (bit-exact here)
    seqs = _sequences(256, lengths=(20, 20, 7))
    ref = _whole_model_routing(_load(mxfp4_dir, torch.bfloat16), seqs)
    got: dict = {}
    stream_trace(mxfp4_dir, seqs, lambda i, r: got.__setitem__(i, r), dtype=torch.bfloat16, progress=False)
    for i in ref:
        np.testing.assert_array_equal(got[i]["expert_ids"], ref[i]["expert_ids"])
        for key in ("expert_weights", "router_logits", "expert_norms"):
            np.testing.assert_allclose(got[i][key], ref[i][key], rtol=1e-2, atol=1e-2)


def test_stream_equals_whole_model_dense(dense_dir):
    seqs = _sequences(128, lengths=(12, 12, 7, 25))
    ref = _whole_model_routing(_load(dense_dir), seqs)
    _assert_same(ref, _stream(dense_dir, seqs))


def test_stream_spills_hidden_states(mxfp4_dir, tmp_path):
    seqs = _sequences(256, lengths=(16, 9, 16))
    kw = dict(expert_norms=False, layers=[0, 2])
    in_ram = _stream(mxfp4_dir, seqs, **kw)
    on_disk = _stream(mxfp4_dir, seqs, spill_dir=tmp_path / "spill", **kw)
    assert sorted(on_disk) == [0, 2]
    for i in on_disk:
        for key in in_ram[i]:
            np.testing.assert_array_equal(on_disk[i][key], in_ram[i][key])
    assert list((tmp_path / "spill").iterdir()) == []  # spill file removed
    # a memory limit between "with" and "without" hidden states spills on its own
    config = Checkpoint(mxfp4_dir).config
    plan = predict_peak_memory(config, 41, dtype=torch.float32, max_seq_len=16)
    res = stream_trace(mxfp4_dir, seqs, lambda i, r: None, dtype=torch.float32, progress=False,
                       memory_limit_bytes=plan["total_spilled"] + 1, layers=[0], expert_norms=False)
    assert res.spilled
    with pytest.raises(UspxError, match="limit"):
        stream_trace(mxfp4_dir, seqs, lambda i, r: None, progress=False, memory_limit_bytes=1000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hidden_store_on_disk_round_trips(tmp_path, dtype):
    from uspx.stream.trace import HiddenStore

    values = torch.randn(10, 6).to(dtype)
    store = HiddenStore(10, 6, dtype, tmp_path)
    rows = np.array([7, 1, 3])
    store.write(np.arange(10), values)
    store.write(rows, values[rows] * 2)
    want = values.clone()
    want[rows] = values[rows] * 2
    assert torch.equal(store.read(np.arange(10)), want)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_stream_refuses_bad_input(mxfp4_dir, dense_dir):
    with pytest.raises(UspxError, match="vocabulary"):
        stream_trace(mxfp4_dir, [[1, 2, 999]], lambda i, r: None, progress=False)
    with pytest.raises(UspxError, match="empty"):
        stream_trace(dense_dir, [[]], lambda i, r: None, progress=False)


def test_predict_peak_memory_20b():
    plan = predict_peak_memory(gpt_oss_config("20b"), 100_000)
    # one dense bf16 layer of gpt-oss-20b: 32 experts * 24.9M params + attention, about 1.6 GB
    assert 1.5e9 < plan["layer_weights"] < 1.8e9
    assert plan["hidden_states"] == 100_000 * 2880 * 2
    assert plan["total"] == plan["total_spilled"] + plan["hidden_states"]
    assert plan["total"] < 20 * 2**30  # fits the 24 GB machine the real model does not fit whole


# ----- pruning on disk ------------------------------------------------------------------------
def test_prune_mxfp4_checkpoint_equals_restriction(mxfp4_dir, tmp_path):
    dst = prune_mxfp4_checkpoint(mxfp4_dir, KEPT, tmp_path / "pruned")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["quantization_config"]["quant_method"] == "mxfp4"

    src_ckpt, dst_ckpt = Checkpoint(mxfp4_dir), Checkpoint(dst)
    for name in ("model.layers.2.mlp.experts.gate_up_proj_blocks", "model.layers.2.mlp.experts.down_proj_scales",
                 "model.layers.2.mlp.router.bias"):
        assert torch.equal(dst_ckpt.get(name), src_ckpt.get(name)[KEPT[2]])  # bytes sliced, not requantized

    # sizes: the index total drops by exactly the dropped experts' bytes; files by that plus header digits
    src_index = json.loads((mxfp4_dir / "model.safetensors.index.json").read_text())
    dst_index = json.loads((dst / "model.safetensors.index.json").read_text())
    per_layer_expert_bytes = sum(
        s.nbytes // 8 for s in tensor_specs(gpt_oss_config("tiny"))
        if s.name.startswith("model.layers.0.mlp.")
    )
    dropped = 4 * 4 * per_layer_expert_bytes  # 4 layers * 4 dropped experts
    assert src_index["metadata"]["total_size"] - dst_index["metadata"]["total_size"] == dropped
    assert dst_index["metadata"]["total_size"] == pruned_bytes(mxfp4_dir, 4)
    src_size = sum(f.stat().st_size for f in src_ckpt.files())
    dst_size = sum(f.stat().st_size for f in dst_ckpt.files())
    assert 0 <= (src_size - dst_size) - dropped < 64 * len(src_ckpt.files())

    original, pruned = _load(mxfp4_dir), _load(dst)
    ids = torch.tensor([_sequences(256, lengths=(24,))[0]])
    with torch.no_grad(), adapter_for(original).restrict(KEPT):
        want = original(ids, use_cache=False).logits
    with torch.no_grad():
        got = pruned(ids, use_cache=False).logits
        unrestricted = original(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(unrestricted, want, atol=1e-2)  # the kept set does change the model


def test_prune_refuses_bad_kept_sets(mxfp4_dir, tmp_path):
    with pytest.raises(UspxError, match="same expert count"):
        prune_mxfp4_checkpoint(mxfp4_dir, {**KEPT, 3: [0, 1, 2]}, tmp_path / "a")
    with pytest.raises(UspxError, match="no entry"):
        prune_mxfp4_checkpoint(mxfp4_dir, {0: KEPT[0]}, tmp_path / "b")
    with pytest.raises(UspxError, match="top-k"):
        prune_mxfp4_checkpoint(mxfp4_dir, {i: [0] for i in range(4)}, tmp_path / "c")
    with pytest.raises(UspxError, match="different folder"):
        prune_mxfp4_checkpoint(mxfp4_dir, KEPT, mxfp4_dir)
