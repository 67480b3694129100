"""Narrower experts cut from the stored files (MXFP4 in whole blocks of 32 channels) and the joint
cut as what ``uspx extract`` does under a budget.

The exported bytes are compared with slices of the source file taken here with safetensors and
index arithmetic written from the gpt-oss layout (gate and up of channel ``c`` are rows ``2c`` and
``2c + 1`` of ``gate_up_proj_blocks``; ``down_proj_blocks`` packs channels 32 to a block along its
third dim); the logits with a model loaded by stock transformers (``Mxfp4Config(dequantize=True)``)
and masked here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import make_tokenizer, write_jsonl
from uspx.io import UspxError

BLOCK = 32


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def mxfp4_src(tmp_path_factory):
    """A random gpt-oss MXFP4 checkpoint: 4 layers of 8 experts of 128 channels (4 blocks)."""
    from uspx.models.synthetic import write_gpt_oss

    src = write_gpt_oss(tmp_path_factory.mktemp("mx") / "src", "tiny", intermediate_size=128, seed=3)
    make_tokenizer().save_pretrained(src)
    return src


def _block_plan(src, tmp_path, *, groups_kept=2, heads=True, aligned=True):
    """Half the experts, ``groups_kept`` random blocks of 32 channels per kept expert, one query
    head in each KV group; written as a plan file by hand."""
    from uspx.plan.select import Plan

    cfg = json.loads((src / "config.json").read_text())
    n_exp, width, layers = cfg["num_local_experts"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    rep = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    g = torch.Generator().manual_seed(1)
    kept = {l: torch.randperm(n_exp, generator=g)[: n_exp // 2].sort().values.tolist() for l in range(layers)}
    channels = {}
    for l, experts in kept.items():
        channels[l] = []
        for _ in experts:
            blocks = torch.randperm(width // BLOCK, generator=g)[:groups_kept].sort().values
            ids = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1).tolist()
            if not aligned:  # the same count, one channel over: every kept run straddles two blocks
                ids = sorted((c + 1) % width for c in ids)
            channels[l].append(ids)
    head_ids = {i: [k * rep + int(torch.randint(rep, (1,), generator=g)) for k in range(cfg["num_key_value_heads"])]
                for i in range(layers)}
    # the bytes such a cut holds, from the source's tensors: experts' tensors by the share of experts
    # kept, channel tensors also by the share of channels, query-head tensors by the share of heads
    size = 0
    for name, t in _tensors(src).items():
        n = t.numel() * t.element_size()
        if ".mlp." in name:
            n = n // 2
        if "gate_up_proj" in name or "down_proj_blocks" in name or "down_proj_scales" in name:
            n = n * groups_kept * BLOCK // width
        if heads and any(k in name for k in ("q_proj", "o_proj.weight", "sinks")):
            n = n // rep
        size += n
    plan = Plan(kept=kept, method="test", uniform=True, top_k=cfg["num_experts_per_tok"], num_experts=n_exp,
                predicted_bytes=size, settings={"dtype": "mxfp4"},
                channels={"width": groups_kept * BLOCK, "original_width": width, "kept": channels, "group": BLOCK},
                heads={"kv_groups": cfg["num_key_value_heads"], "heads_per_group": 1,
                       "original_kv_groups": cfg["num_key_value_heads"], "original_heads_per_group": rep,
                       "kept": head_ids} if heads else None)
    plan.save(tmp_path / "plan.json")
    return plan


def test_mxfp4_blocks_and_scales_are_copied_byte_for_byte(mxfp4_src, tmp_path, one_thread):
    from uspx.plan.select import load_plan
    from uspx.prune import export

    _block_plan(mxfp4_src, tmp_path)
    plan = load_plan(tmp_path / "plan.json")
    record = export(mxfp4_src, tmp_path / "plan.json", tmp_path / "out")
    assert record["size"]["actual_bytes"] == plan.predicted_bytes
    src, out = _tensors(mxfp4_src), _tensors(tmp_path / "out")
    hd = json.loads((mxfp4_src / "config.json").read_text())["head_dim"]
    for l, experts in plan.kept.items():
        p = f"model.layers.{l}"
        for new, (e, ch) in enumerate(zip(experts, plan.channels["kept"][l])):
            rows = [r for c in ch for r in (2 * c, 2 * c + 1)]
            blocks = sorted({c // BLOCK for c in ch})
            for kind in ("blocks", "scales"):
                gu = src[f"{p}.mlp.experts.gate_up_proj_{kind}"][e][rows]
                assert torch.equal(out[f"{p}.mlp.experts.gate_up_proj_{kind}"][new], gu)
                down = src[f"{p}.mlp.experts.down_proj_{kind}"][e][:, blocks]
                assert torch.equal(out[f"{p}.mlp.experts.down_proj_{kind}"][new], down)
            assert torch.equal(out[f"{p}.mlp.experts.gate_up_proj_bias"][new], src[f"{p}.mlp.experts.gate_up_proj_bias"][e][rows])
            assert torch.equal(out[f"{p}.mlp.experts.down_proj_bias"][new], src[f"{p}.mlp.experts.down_proj_bias"][e])
            assert torch.equal(out[f"{p}.mlp.router.weight"][new], src[f"{p}.mlp.router.weight"][e])
        heads = plan.heads["kept"][l]
        q_rows = [h * hd + i for h in heads for i in range(hd)]
        assert torch.equal(out[f"{p}.self_attn.q_proj.weight"], src[f"{p}.self_attn.q_proj.weight"][q_rows])
        assert torch.equal(out[f"{p}.self_attn.o_proj.weight"], src[f"{p}.self_attn.o_proj.weight"][:, q_rows])
        assert torch.equal(out[f"{p}.self_attn.sinks"], src[f"{p}.self_attn.sinks"][heads])
        assert torch.equal(out[f"{p}.self_attn.k_proj.weight"], src[f"{p}.self_attn.k_proj.weight"])  # every group kept
    # the bytes are the source's own: the precision did not change and nothing else was written
    assert {k: v.dtype for k, v in out.items()} == {k: src[k].dtype for k in out}
    assert record["dtype"] == "mxfp4" and record["channels"]["group"] == BLOCK
    assert record["verification"]["max_abs_logit_diff"] <= 1e-4


def test_mxfp4_cut_loads_stock_and_equals_the_masked_model(mxfp4_src, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from uspx.prune import export

    plan = _block_plan(mxfp4_src, tmp_path)
    export(mxfp4_src, tmp_path / "plan.json", tmp_path / "out")
    load = dict(quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **load)
    assert got_model.config.intermediate_size == 2 * BLOCK and got_model.config.num_local_experts == 4
    ref = AutoModelForCausalLM.from_pretrained(mxfp4_src, **load)
    hd = ref.config.head_dim
    with torch.no_grad():
        for l, layer in enumerate(ref.model.layers):
            experts = layer.mlp.experts
            for e, ch in zip(plan.kept[l], plan.channels["kept"][l]):
                drop = [c for c in range(ref.config.intermediate_size) if c not in ch]
                experts.down_proj[e, drop] = 0  # down_proj [E, I, H]: a dropped channel writes nothing
            o = layer.self_attn.o_proj.weight
            for h in range(ref.config.num_attention_heads):
                if h not in plan.heads["kept"][l]:
                    o[:, h * hd:(h + 1) * hd] = 0
            # routing among the kept experts only: the others' router logits are -inf
            dropped = [e for e in range(ref.config.num_local_experts) if e not in plan.kept[l]]
            layer.mlp.router.bias[dropped] = float("-inf")
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = ref(ids).logits, got_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mxfp4_cut_streamed_verifies_layer_by_layer(mxfp4_src, tmp_path, one_thread):
    from uspx.engine import open_source
    from uspx.prune import export

    _block_plan(mxfp4_src, tmp_path, heads=False)
    record = export(open_source(mxfp4_src, streaming=True), tmp_path / "plan.json", tmp_path / "out")
    assert record["verification"]["reloaded_with"].startswith("layer by layer")
    assert record["verification"]["max_abs_logit_diff"] <= 1e-4
    whole = export(mxfp4_src, tmp_path / "plan.json", tmp_path / "out2")
    assert _tensors(tmp_path / "out").keys() == _tensors(tmp_path / "out2").keys()
    assert all(torch.equal(a, _tensors(tmp_path / "out2")[k]) for k, a in _tensors(tmp_path / "out").items())
    assert whole["size"]["actual_bytes"] == record["size"]["actual_bytes"]


def test_mxfp4_channels_off_block_boundaries_are_refused(mxfp4_src, tmp_path):
    from uspx.prune import export

    _block_plan(mxfp4_src, tmp_path, aligned=False)
    with pytest.raises(UspxError, match="whole blocks of 32"):
        export(mxfp4_src, tmp_path / "plan.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_mxfp4_selection_keeps_each_experts_best_blocks(mxfp4_src, tmp_path, one_thread):
    """Under an MXFP4 budget the unit is a block of 32 channels scored as the sum of its channels:
    each kept expert's blocks are its best by that sum (computed here), and the plan's size is
    the exported size to the byte."""
    import pyarrow as pa

    from uspx.plan.joint import select_units
    from uspx.prune import export
    from uspx.prune.files import weight_files
    from uspx.score.units import UnitScores, _rows

    cfg = json.loads((mxfp4_src / "config.json").read_text())
    n_exp, width, layers = cfg["num_local_experts"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    rng = np.random.default_rng(0)
    experts = {l: rng.random(n_exp) for l in range(layers)}
    chan = {l: rng.random((n_exp, width)) for l in range(layers)}
    nan = lambda a: np.full_like(a, np.nan)  # noqa: E731
    table = UnitScores(pa.concat_tables([_rows("channel", l, "reconstruction", m, nan(m), nan(m), 4) for l, m in chan.items()]))
    budget = int(weight_files(mxfp4_src).tensor_bytes * 0.8)
    plan = select_units(experts, table, mxfp4_src, units="experts,channels", budget=budget, dtype="mxfp4", context=0)
    assert plan.channels["group"] == BLOCK and plan.channels["width"] % BLOCK == 0
    n_blocks = plan.channels["width"] // BLOCK
    for l, kept in plan.kept.items():
        for e, ch in zip(kept, plan.channels["kept"][l]):
            sums = chan[l][e].reshape(-1, BLOCK).sum(1)
            best = sorted(np.argsort(-sums)[:n_blocks].tolist())
            assert ch == [b * BLOCK + i for b in best for i in range(BLOCK)]
    assert plan.predicted_bytes <= budget
    # the memory planner's size of that shape is the exported size to the byte
    plan.save(tmp_path / "plan.json")
    record = export(mxfp4_src, tmp_path / "plan.json", tmp_path / "out")
    assert record["size"]["actual_bytes"] == plan.predicted_bytes


def test_extract_cuts_jointly_under_a_budget_and_reports_whole_experts(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.extract import extract
    from uspx.prune.files import weight_files

    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code"} for i in range(16)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    budget = int(weight_files(tiny_gpt_oss_dir).tensor_bytes * 0.7)
    report = extract(tiny_gpt_oss_dir, wl, tmp_path / "run", budget=budget, context=16, speed=False, progress=False)
    assert report["units"] == ["experts", "channels", "heads"]
    shape, alt = report["shape"], report["whole_experts"]
    assert alt["shape"]["width"] is None and alt["shape"]["experts"] < shape["num_experts"]
    # both cuts fit the budget and are real exports of their shapes
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg["num_local_experts"] == shape["experts"] and cfg["intermediate_size"] == shape["width"]
    alt_cfg = json.loads((tmp_path / "run" / "whole_experts" / "model" / "config.json").read_text())
    assert alt_cfg["num_local_experts"] == alt["shape"]["experts"]
    assert alt_cfg["intermediate_size"] == shape["original_width"]
    # the joint cut keeps at least the value the whole-experts cut keeps (its shapes include that one)
    joint_plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    alt_plan = json.loads((tmp_path / "run" / "whole_experts" / "plan.json").read_text())
    assert joint_plan["value"] >= alt_plan["value"] - 1e-9
    assert alt["fits"] and isinstance(alt["overall_delta"], float)
    # below what any whole-experts cut reaches, the joint cut still fits and says so
    small = extract(tiny_gpt_oss_dir, wl, tmp_path / "small", budget=budget // 2, context=16, speed=False,
                    progress=False)
    assert not small["whole_experts"]["fits"] and "smallest size" in small["whole_experts"]["reason"]
    assert small["size"]["actual_bytes"] <= budget // 2
    # --units experts is today's cut, and --keep cuts whole experts only
    only = extract(tiny_gpt_oss_dir, wl, tmp_path / "experts", budget=budget, context=16, units="experts",
                   speed=False, progress=False)
    assert only["units"] == ["experts"] and "whole_experts" not in only and only["shape"]["width"] is None
    with pytest.raises(UspxError, match="--keep counts whole experts"):
        extract(tiny_gpt_oss_dir, wl, tmp_path / "bad", keep="50%", units="experts,channels", progress=False)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe", "qwen3_moe"])
def test_unit_scores_layer_by_layer_equal_the_whole_model(family, tmp_path, one_thread):
    """Channel (expert and dense) and head contributions measured a decoder layer at a time from the
    files equal those of the model in memory (every row, both methods, the intervals too)."""
    from conftest import save_tiny
    from uspx.engine import FromCheckpoint
    from uspx.models import load_model
    from uspx.score.units import score_units
    from uspx.workload import EncodedItem

    src = save_tiny(family, tmp_path / "src")
    g = torch.Generator().manual_seed(0)
    items = [EncodedItem(i, str(i), "f", "calibration", torch.randint(2, 90, (7 + 2 * i,), generator=g).tolist(), 0)
             for i in range(5)]
    kw = dict(units=["channels", "heads"], methods=["reconstruction", "activation"], batch_size=2, bootstrap=20)
    whole = score_units(load_model(src, dtype=torch.float32).model, items, **kw).table
    layered = score_units(FromCheckpoint(src, torch.float32), items, **kw).table
    key = ["kind", "method", "layer", "index", "channel"]
    whole, layered = (t.sort_by([(k, "ascending") for k in key]) for t in (whole, layered))
    assert whole.num_rows == layered.num_rows and whole.num_rows > 0
    if family == "qwen2_moe":
        assert "dense_channel" in set(whole.column("kind").to_pylist())
    for k in key:
        assert whole.column(k).to_pylist() == layered.column(k).to_pylist()
    for c in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(layered.column(c).to_numpy(), whole.column(c).to_numpy(), rtol=1e-5, atol=1e-9)
    with pytest.raises(UspxError, match="need the model in memory"):
        score_units(FromCheckpoint(src, torch.float32), items, ["channels"], ["attribution"])


def test_extract_layer_by_layer_cuts_mxfp4_blocks(mxfp4_src, tmp_path, one_thread):
    """A gpt-oss MXFP4 model opened layer by layer: channel and head scores, the joint cut in whole
    blocks, the export cut from the files and verified layer by layer, the experts still MXFP4."""
    from uspx.engine import open_source
    from uspx.extract import extract
    from uspx.prune.files import weight_files

    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code"} for i in range(16)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    budget = int(weight_files(mxfp4_src).tensor_bytes * 0.75)
    report = extract(open_source(mxfp4_src, streaming=True), wl, tmp_path / "run", budget=budget, context=0,
                     speed=False, progress=False)
    assert report["streaming"] and report["units"] == ["experts", "channels", "heads"]
    assert report["shape"]["width"] % BLOCK == 0 and report["size"]["precision"] == "mxfp4"
    assert report["size"]["actual_bytes"] == report["size"]["plan_bytes"]
    assert report["verification"]["reloaded_with"].startswith("layer by layer")
    assert report["verification"]["max_abs_logit_diff"] <= 1e-4


def test_recovery_after_a_joint_cut_keeps_the_narrowed_shape(tiny_gpt_oss_dir, tmp_path, one_thread):
    """extract --recover distils the narrowed model: the recovered checkpoint has the joint shape,
    loads stock, and its held-out loss is measured against the original."""
    from transformers import AutoModelForCausalLM

    from uspx.extract import extract
    from uspx.prune.files import weight_files

    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code"} for i in range(16)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    budget = int(weight_files(tiny_gpt_oss_dir).tensor_bytes * 0.6)
    report = extract(tiny_gpt_oss_dir, wl, tmp_path / "run", budget=budget, context=16, speed=False, progress=False,
                     compare=False, recover=True, recover_steps=2)
    shape = report["shape"]
    assert shape["width"] < shape["original_width"] or shape["experts"] < shape["num_experts"]
    model = AutoModelForCausalLM.from_pretrained(report["recovered"]["model"])
    assert model.config.intermediate_size == shape["width"] and model.config.num_local_experts == shape["experts"]
    assert model.config.num_key_value_heads == shape["kv_groups"]
    assert report["recovered"]["heldout"]["all"]["tokens"] > 0


def test_unit_bootstrap_replicates_are_bounded_per_layer():
    """A layer of many units keeps only the bootstrap replicates that fit its memory bound; its
    interval comes from those, each the resampled total over its own resampled token count."""
    from uspx.score.units import REPLICATE_BYTES, _Sums

    counts = np.random.default_rng(0).integers(1, 4, size=(200, 3)).astype(np.float64)
    assert _Sums((8, 16), counts).rep.shape[0] == 200
    big = _Sums((32, 2880), counts)  # gpt-oss-20b's channels of one layer
    assert big.rep.shape[0] == REPLICATE_BYTES // (8 * 32 * 2880) == 22
    assert _Sums((400_000,), counts).rep.shape[0] == 0  # fewer than 20 fit: no interval
    per_prompt = torch.rand(3, 32, 2880, dtype=torch.float64)
    big.add(per_prompt, torch.arange(3))
    tokens = np.array([5.0, 7.0, 11.0])
    value, low, high = big.ratio(tokens.sum(), counts @ tokens)
    reps = np.einsum("bp,pij->bij", counts[:22], per_prompt.numpy()) / (counts[:22] @ tokens)[:, None, None]
    np.testing.assert_allclose(value, per_prompt.sum(0).numpy() / tokens.sum())
    np.testing.assert_allclose(low, np.percentile(reps, 2.5, axis=0))
    np.testing.assert_allclose(high, np.percentile(reps, 97.5, axis=0))


def test_extract_judges_checked_items_with_the_pass_drop_rule(tiny_gpt_oss_dir, tmp_path, one_thread):
    """Checked held-out items are answered by the original and the cut model inside extract; a
    pass-drop allowance that cannot be met fails by name, and the report carries the task figures."""
    from uspx.extract import extract

    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code", "split": "calibration"}
            for i in range(12)]
    rows += [{"id": f"q{i}", "family": "code", "split": "heldout", "prompt": f"{i} + {i} =", "regex": "(?s).*",
              "max_new_tokens": 4} for i in range(4)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    report = extract(tiny_gpt_oss_dir, wl, tmp_path / "run", keep="50%", method="frequency", speed=False,
                     progress=False, tasks=dict(max_pass_drop=-0.5))  # a negative allowance cannot be met
    fam = report["tasks"]["families"]["code"]
    assert fam["items"] == 4 and fam["teacher"]["pass@1"] == 1.0  # "(?s).*" matches every answer
    assert report["acceptance"]["verdict"] == "fail" and "pass_drop" in report["acceptance"]["failed_rules"]
    assert (tmp_path / "run" / "evaluation.items.jsonl").exists()


def test_layer_check_catches_a_wrong_slice_in_a_middle_layer(mxfp4_src, tmp_path, one_thread):
    """Each layer of the export is judged on the original's inputs: a slice taken wrong in layer 1
    shows in that layer's output (the logits alone would see only the last layer), while the
    correct layers differ by float rounding only."""
    from safetensors.torch import save_file

    from uspx.engine import FromCheckpoint
    from uspx.plan.select import load_plan
    from uspx.prune import export
    from uspx.prune.shaped import layer_masker
    from uspx.prune.verify import compare_layers, verification_items, within_tolerance

    _block_plan(mxfp4_src, tmp_path, heads=False)
    export(mxfp4_src, tmp_path / "plan.json", tmp_path / "out")
    plan = load_plan(tmp_path / "plan.json")

    def check():
        ref = FromCheckpoint(mxfp4_src, torch.float32, experts=plan.kept)
        ref.edit = layer_masker(ref.adapter, plan)
        return compare_layers(ref, plan.kept, FromCheckpoint(tmp_path / "out", torch.float32),
                              verification_items(None, None, 256))

    good = check()
    assert within_tolerance(good, 1e-4) and len(good["max_abs_hidden_diff"]) == 3
    # swap the gate/up rows of two kept channels of every expert of layer 1: a wrong slice
    shard = next((tmp_path / "out").glob("*.safetensors"))
    tensors = _tensors(tmp_path / "out")
    for kind in ("blocks", "scales"):
        name = f"model.layers.1.mlp.experts.gate_up_proj_{kind}"
        t = tensors[name].clone()
        t[:, [0, 1, 2, 3]] = tensors[name][:, [2, 3, 0, 1]]
        tensors[name] = t
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bad = check()
    assert not within_tolerance(bad, 1e-4)
    assert bad["max_abs_hidden_diff"][1] > 1e3 * good["max_abs_hidden_diff"][1]
    assert bad["max_abs_hidden_diff"][0] == pytest.approx(good["max_abs_hidden_diff"][0])


def test_hand_built_mxfp4_tensors_slice_to_the_kept_rows_and_blocks():
    """gpt-oss's stored MXFP4 layout, on tensors whose every byte names where it came from: the
    positions the adapter keeps for channels {32..63, 96..127} of a 128-channel expert are gate/up
    rows 64..127 and 192..255 (two per channel, interleaved) and down blocks 1 and 3."""
    from uspx.models.gpt_oss import GptOssAdapter

    E, I, H = 2, 128, 64
    # gate_up_proj_blocks [E, 2I, H/32, 16]: the byte is its row (mod 256) so a slice shows its rows
    gate_up = torch.arange(2 * I, dtype=torch.uint8).reshape(1, 2 * I, 1, 1).expand(E, 2 * I, H // 32, 16)
    # down_proj_blocks [E, H, I/32, 16]: the byte is its block of 32 channels
    down = torch.arange(I // 32, dtype=torch.uint8).reshape(1, 1, I // 32, 1).expand(E, H, I // 32, 16)
    kept = torch.cat([torch.arange(32, 64), torch.arange(96, 128)])
    for name, tensor in (("model.layers.0.mlp.experts.gate_up_proj_blocks", gate_up),
                         ("model.layers.0.mlp.experts.gate_up_proj_scales", gate_up[..., 0])):
        dim, pos = GptOssAdapter.stored_channel_index(name, kept)
        got = tensor.index_select(dim, pos).reshape(E, 2 * len(kept), -1)
        assert dim == 1
        for e in range(E):  # every byte of a kept row is that row's number
            assert (got[e] == torch.tensor(list(range(64, 128)) + list(range(192, 256)))[:, None]).all()
    for name, tensor in (("model.layers.0.mlp.experts.down_proj_blocks", down),
                         ("model.layers.0.mlp.experts.down_proj_scales", down[..., 0])):
        dim, pos = GptOssAdapter.stored_channel_index(name, kept)
        got = tensor.index_select(dim, pos)
        assert dim == 2 and got.shape[2] == 2
        assert (got[:, :, 0] == 1).all() and (got[:, :, 1] == 3).all()  # blocks 1 and 3, whole
    assert GptOssAdapter.stored_channel_index("model.layers.0.mlp.experts.down_proj_bias", kept) is None
    assert GptOssAdapter.stored_channel_index("model.layers.0.mlp.router.weight", kept) is None
    with pytest.raises(UspxError, match="whole blocks of 32"):
        GptOssAdapter.stored_channel_index("model.layers.0.mlp.experts.down_proj_blocks", kept[1:])
