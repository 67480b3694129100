"""The engine: a checkpoint run a decoder layer at a time computes what the whole model computes, for
every family; its hidden-state store, spill and resume; MXFP4 checkpoints decoded per layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import save_tiny
from uspx.engine import FromCheckpoint, InMemory, make_batches, run
from uspx.engine.checkpoint import Checkpoint
from uspx.engine.memory import predict_peak_memory
from uspx.engine.observers import Logits, Reconstruction, Routing, TokenLoss
from uspx.engine.store import HiddenStore
from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.models.synthetic import (checkpoint_bytes, gpt_oss_config, qwen3_moe_config, qwen3_moe_tensor_specs,
                                   tensor_specs, write_gpt_oss, write_qwen3_moe)
from uspx.testing import TINY_CONFIGS
from uspx.workload import EncodedItem

FAMILIES = sorted(TINY_CONFIGS)
KEPT = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6], 2: [0, 1, 4, 5], 3: [3, 4, 6, 7]}


def _items(vocab: int, lengths=(11, 7, 11, 3, 16), seed: int = 0) -> list[EncodedItem]:
    g = torch.Generator().manual_seed(seed)
    return [EncodedItem(i, str(i), "f", "calibration", torch.randint(2, vocab, (n,), generator=g).tolist(), 0)
            for i, n in enumerate(lengths)]


def _load(path, dtype=torch.float32):
    """Stock from_pretrained; MXFP4 on CPU dequantized, as transformers does without GPU kernels."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    cfg = json.loads((path / "config.json").read_text())
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if "quantization_config" in cfg else {}
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _observe(source, items, batch_size=2, kept=None):
    """Routing (with logits and norms), reconstruction sums and per-item losses of one run."""
    n = sum(len(e.input_ids) for e in items)
    routing = Routing(n, logits=True, norms=True)
    recon = Reconstruction(np.repeat(np.arange(len(items)), [len(e.input_ids) for e in items]), len(items))
    loss = TokenLoss(len(items))
    ctx = source.adapter.restrict(kept) if kept else torch.no_grad()
    with ctx:
        run(source, make_batches(items, batch_size, 0, by_length=False), [routing, recon, loss], progress=False)
    return routing.layers, recon.layers, loss


def _reference_routing(model, items):
    """Routing straight from the routers of transformers' own forward, one item at a time (no padding)."""
    adapter = adapter_for(model)
    got: dict = {l.index: [] for l in adapter.layers}
    handles = [l.router.register_forward_hook(
        lambda m, a, out, i=l.index: got[i].append(adapter.router_logits(out).detach().reshape(-1, adapter.num_experts)))
        for l in adapter.layers]
    with torch.no_grad():
        for e in items:
            model(torch.tensor([e.input_ids]), use_cache=False)
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_whole_model(family, tmp_path, one_thread):
    path = save_tiny(family, tmp_path / family)
    model = _load(path)
    items = _items(int(model.config.vocab_size))
    whole = _observe(InMemory(model), items)
    layered = _observe(FromCheckpoint(path, torch.float32), items)
    ref_logits = _reference_routing(model, items)
    for layer, arrays in whole[0].items():
        np.testing.assert_array_equal(layered[0][layer]["expert_ids"], arrays["expert_ids"], err_msg=f"{family} {layer}")
        for key in ("expert_weights", "router_logits", "expert_norms"):
            np.testing.assert_allclose(layered[0][layer][key], arrays[key], rtol=1e-5, atol=1e-5, err_msg=key)
        # and both equal the routers' own logits in an unpadded forward
        np.testing.assert_allclose(arrays["router_logits"], ref_logits[layer].numpy(), rtol=1e-4, atol=1e-4)
        # highest weight first
        w = arrays["expert_weights"]
        assert (np.diff(w, axis=1) <= 1e-7).all()
        for key in ("reconstruction_error", "reconstruction_routed"):
            np.testing.assert_allclose(layered[1][layer][key], whole[1][layer][key], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(layered[2].sum_loss, whole[2].sum_loss, rtol=1e-5)
    # the loss against an independent computation: transformers' own logits, item by item
    with torch.no_grad():
        for i, e in enumerate(items):
            logits = model(torch.tensor([e.input_ids]), use_cache=False).logits[0, :-1]
            want = torch.nn.functional.cross_entropy(logits, torch.tensor(e.input_ids[1:]), reduction="sum")
            assert abs(whole[2].sum_loss[i] - float(want)) < 1e-3 * max(1.0, float(want))


def test_reconstruction_matches_a_hand_computed_ban(tmp_path, one_thread):
    """Banning each routed expert for one token in the router by hand gives the observer's sums."""
    path = save_tiny("mixtral", tmp_path / "m")
    model = _load(path)
    adapter = adapter_for(model)
    items = _items(100, lengths=(6,))
    _, recon, _ = _observe(InMemory(model), items, batch_size=1)
    layer = adapter.layers[1]
    captured = {}
    h = layer.block.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        model(torch.tensor([items[0].input_ids]), use_cache=False)
    h.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    want = np.zeros(adapter.num_experts)
    with torch.no_grad():
        y = layer.block(x[None]).reshape(x.shape)
        logits = layer.router(x)[0]
        for t in range(x.shape[0]):
            _, index = adapter.route(layer, logits[t : t + 1])
            for e in index[0].tolist():
                kept = [k for k in range(adapter.num_experts) if k != e]
                with adapter.restrict({layer.index: kept}):
                    y_e = layer.block(x[t : t + 1][None]).reshape(1, -1)
                want[e] += float((y[t] - y_e[0]).double().pow(2).sum())
    np.testing.assert_allclose(recon[layer.index]["reconstruction_error"][0], want, rtol=1e-6, atol=1e-10)


def test_restricted_run_equals_restricted_whole_model(tmp_path, one_thread):
    path = write_gpt_oss(tmp_path / "mx", "tiny", max_shard_bytes=200_000)
    model = _load(path)
    items = _items(256, lengths=(9, 14))
    with adapter_for(model).restrict(KEPT):
        want = _observe(InMemory(model), items)[2].sum_loss
    got = _observe(FromCheckpoint(path, torch.float32, experts=KEPT), items, kept=KEPT)[2].sum_loss
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_restricted_run_never_reads_banned_experts(tmp_path, monkeypatch, one_thread):
    """Only kept MXFP4 experts are decoded; the other rows stay unwritten (never resident). Filling
    them with NaN must not change the logits: grouped expert kernels skip experts without tokens."""
    import uspx.models.gpt_oss as gpt_oss_mod

    path = write_gpt_oss(tmp_path / "mx", "tiny")
    items = _items(256, lengths=(8, 3))

    def logits():
        obs = Logits(len(items))
        source = FromCheckpoint(path, torch.float32, experts=KEPT)
        with source.adapter.restrict(KEPT):
            run(source, make_batches(items, 2), [obs], progress=False)
        return torch.cat(obs.per_item)

    want = logits()
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(gpt_oss_mod.torch, "empty", nan_empty)
    got = logits()
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_mxfp4_checkpoint_layer_by_layer_equals_stock_load(tmp_path, one_thread):
    path = write_gpt_oss(tmp_path / "mx", "tiny", max_shard_bytes=200_000)
    ckpt = Checkpoint(path)
    assert len(ckpt.files()) > 1 and (path / "model.safetensors.index.json").exists()
    model = _load(path)
    items = _items(256)
    whole, layered = _observe(InMemory(model), items), _observe(FromCheckpoint(path, torch.float32), items)
    for layer in whole[0]:
        np.testing.assert_array_equal(layered[0][layer]["expert_ids"], whole[0][layer]["expert_ids"])
        np.testing.assert_allclose(layered[0][layer]["expert_norms"], whole[0][layer]["expert_norms"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layered[2].sum_loss, whole[2].sum_loss, rtol=1e-5)


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
    assert 12.7 < checkpoint_bytes(gpt_oss_config("20b")) / 2**30 < 12.9  # the published one is 12.8 GiB


def test_synthetic_qwen3_moe_is_what_transformers_writes(tmp_path, one_thread):
    """write_qwen3_moe's files load with stock from_pretrained (no missing, unexpected or mismatched
    keys) and hold the names, shapes and dtypes transformers' own save_pretrained writes; the
    checkpoint runs layer by layer as the stock load runs whole."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = write_qwen3_moe(tmp_path / "q", num_layers=3, scale="tiny", mlp_only_layers=[1], max_shard_bytes=20_000)
    assert len(Checkpoint(path).files()) > 1
    model = _load(path)  # asserts no missing / unexpected / mismatched keys

    def layout(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                out.update({k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()})
        return out

    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path / "ref")
    assert layout(path) == layout(tmp_path / "ref")

    items = _items(128)
    whole, layered = _observe(InMemory(model), items), _observe(FromCheckpoint(path, torch.float32), items)
    assert sorted(whole[0]) == [0, 2]
    for layer in whole[0]:
        np.testing.assert_array_equal(layered[0][layer]["expert_ids"], whole[0][layer]["expert_ids"])
    np.testing.assert_allclose(layered[2].sum_loss, whole[2].sum_loss, rtol=1e-5)

    # full size: Qwen3-30B-A3B's shapes, per-expert tensors stacked as transformers' model holds them
    cfg = qwen3_moe_config(2)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    specs = {s.name: s.shape for s in qwen3_moe_tensor_specs(cfg)}
    stacked = {n: t for n, t in specs.items() if ".experts." not in n}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        e, (i, h) = cfg["num_experts"], specs[p + "0.gate_proj.weight"]
        assert all(specs[f"{p}{x}.{w}.weight"] == ((h, i) if w == "down_proj" else (i, h))
                   for x in range(e) for w in ("gate_proj", "up_proj", "down_proj"))
        stacked[p + "gate_up_proj"], stacked[p + "down_proj"] = (e, 2 * i, h), (e, h, i)
    assert stacked == {n: tuple(t.shape) for n, t in full.state_dict().items()}
    assert specs["model.layers.0.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert specs["lm_head.weight"] == (151936, 2048)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hidden_store_on_disk_round_trips(tmp_path, dtype):
    values = torch.randn(10, 6).to(dtype)
    store = HiddenStore(10, 6, dtype, tmp_path)
    rows = np.array([7, 1, 3])
    store.write(np.arange(10), values)
    store.write(rows, values[rows] * 2)
    want = values.clone()
    want[rows] = values[rows] * 2
    assert torch.equal(store.read(np.arange(10)), want)
    store.save(tmp_path / "saved.bin")
    other = HiddenStore(10, 6, dtype, None)
    other.load(tmp_path / "saved.bin")
    assert torch.equal(other.read(np.arange(10)), want)
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.bin"]


def test_spilled_and_resumed_runs_equal_one_run(tmp_path, one_thread):
    """Hidden states on disk give the same numbers; a run killed after a layer resumes there."""
    import uspx.engine.runner as run_mod

    path = save_tiny("qwen3_moe", tmp_path / "q")
    items = _items(100)

    def routing(**kw):
        layers: dict = {}
        obs = Routing(sum(len(e.input_ids) for e in items), on_layer=lambda i, a: layers.__setitem__(i, a))
        stats = run(FromCheckpoint(path, torch.float32), make_batches(items, 2), [obs], progress=False, **kw)
        return layers, stats

    ref, _ = routing()
    spilled, stats = routing(spill_dir=tmp_path / "spill")
    assert stats.hidden_on_disk and list((tmp_path / "spill").iterdir()) == []
    for i in ref:
        np.testing.assert_array_equal(spilled[i]["expert_weights"], ref[i]["expert_weights"])

    real = run_mod._save_state

    def killed_after_layer_0(state_dir, key, done, store, save_hidden):
        real(state_dir, key, done, store, save_hidden)
        raise KeyboardInterrupt

    run_mod._save_state = killed_after_layer_0
    try:
        with pytest.raises(KeyboardInterrupt):
            routing(state_dir=tmp_path / "state", state_key="k")
    finally:
        run_mod._save_state = real
    assert json.loads((tmp_path / "state" / "state.json").read_text())["layers_done"] == 1
    resumed, stats = routing(state_dir=tmp_path / "state", state_key="k")
    assert stats.layers_run == [1]  # layer 0 was not run again
    np.testing.assert_array_equal(resumed[1]["expert_weights"], ref[1]["expert_weights"])


def test_bad_checkpoints_are_named(tmp_path):
    path = save_tiny("mixtral", tmp_path / "m")
    with pytest.raises(UspxError, match="config.json"):
        FromCheckpoint(tmp_path / "nothing")
    (path / "model.safetensors").unlink()
    with pytest.raises(UspxError, match="model.safetensors"):
        FromCheckpoint(path)


def test_predict_peak_memory_20b_and_30b_shapes():
    plan = predict_peak_memory(gpt_oss_config("20b"), 100_000)
    # one dense bf16 layer of gpt-oss-20b: 32 experts * 24.9M params + attention, about 1.6 GB
    assert 1.5e9 < plan["layer_weights"] < 1.8e9
    assert plan["hidden_states"] == 100_000 * 2880 * 2
    assert plan["total"] == plan["total_spilled"] + plan["hidden_states"]
    assert plan["total"] < 20 * 2**30
    # Qwen3-30B-A3B's layer: 128 experts of 3 * 2048 * 768 parameters
    qwen = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
    q = predict_peak_memory(qwen, 2048)
    assert 1.2e9 < q["layer_weights"] < 1.3e9  # 128 * 4.72M expert params + attention, bf16
    # two models side by side (evaluation, layer-by-layer recovery): two hidden streams, both heads
    # and both logit chunks at once, but their layers take turns
    single = predict_peak_memory(gpt_oss_config("20b"), 4096, head_tokens=256)
    pair = predict_peak_memory(gpt_oss_config("20b"), 4096, head_tokens=256, paired=True)
    assert pair["hidden_states"] == 2 * 4096 * 2880 * 2
    assert pair["head_phase"] == 2 * (201_088 * 2880 * 2 * 2 + 256 * 201_088 * (2 + 12))
    assert pair["layer_weights"] == single["layer_weights"]


def test_lm_head_in_chunks_gives_the_same_losses_and_logits(tmp_path, monkeypatch, one_thread):
    import uspx.engine.runner as runner

    path = save_tiny("olmoe", tmp_path / "o")
    items = _items(100, lengths=(9, 14, 5))

    def measure():
        loss, logits = TokenLoss(len(items), argmax=True), Logits(len(items))
        run(FromCheckpoint(path, torch.float32), make_batches(items, 3), [loss, logits], progress=False)
        return loss, logits

    whole_loss, whole_logits = measure()
    monkeypatch.setattr(runner, "HEAD_ROWS", 4)  # every batch's 25 target positions in 7 pieces
    loss, logits = measure()
    np.testing.assert_allclose(loss.sum_loss, whole_loss.sum_loss, rtol=1e-6)
    for a, b, c, d in zip(logits.per_item, whole_logits.per_item, loss.argmax, whole_loss.argmax):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(c, d) and len(c) == len(a)


def test_batch_of_step_reshuffles_each_epoch_from_the_seed_alone():
    """Step s of a run over n items in batches of b: epoch s // ceil(n / b) permutes the items with
    numpy's generator seeded [seed, epoch], and the step takes its slice of that order."""
    from uspx.engine.batches import batch_of_step

    items = _items(100, lengths=(4, 6, 5, 9, 3))
    for step in range(7):
        epoch, pos = divmod(step, 3)  # ceil(5 / 2) = 3 steps per epoch
        order = np.random.default_rng([11, epoch]).permutation(5)
        want = sorted(order[2 * pos : 2 * pos + 2].tolist())
        got = batch_of_step(items, step, 2, 11, pad_id=0)
        assert sorted(e.index for e in got.items) == want
        assert got.input_ids.shape == (len(want), max(len(items[i].input_ids) for i in want))
