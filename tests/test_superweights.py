"""Super-weight detector against planted truth, on tiny gpt_oss and mixtral models.

The planted model: in layer 0, expert E0 is routed by every token (its router row reads a channel
that every embedding carries), its intermediate channel R0 reads the same channel (so it is large
on every routed token), and one scalar W_down[E0][C0, R0] writes that into hidden channel C0: a
massive activation in the residual stream. Later layers depend on it: the LM head reads channel C0
with the workload's unigram log-probabilities, so with the activation the model predicts the
unigram distribution and without it it is a random model. The scalar must be found at exactly
(0, E0, C0, R0), ranked first, and its removal must raise the loss as predicted; the same model
without the plant must yield no super weight.
"""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from conftest import make_tokenizer, write_jsonl
from uspx.io import UspxError
from uspx.models import adapter_for, load_model
from uspx.models import down_proj as dp
from uspx.superweights import apply, detect, run_cli
from uspx.testing import tiny_model

E0, R0, C0, K0 = 3, 5, 7, 11  # expert, ff channel, model channel, channel that drives routing

WORDS = "the cat sat on a mat and the dog ran to the big red house while it was raining in the old town".split()


def _rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 5)]
        rows.append({"text": " ".join(words) + ".", "family": "prose" if i % 2 else "notes"})
    return rows


def _unigram_logp(rows: list[dict], vocab: int) -> torch.Tensor:
    tok = make_tokenizer()
    counts = collections.Counter(t for r in rows for t in tok.encode(r["text"], add_special_tokens=False))
    total = sum(counts.values())
    return torch.tensor([math.log((counts.get(i, 0) + 0.01) / (total + 0.01 * vocab)) for i in range(vocab)])


def _plant(model, rows: list[dict]) -> None:
    """Plant the super weight (see module docstring). Layout-specific gate/up writes are test-only."""
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    ex = layer.experts
    hsize = model.config.hidden_size
    with torch.no_grad():
        model.get_input_embeddings().weight[:, K0] = 2.0
        layer.router.weight[E0, K0] = 10.0
        if adapter.family == "gpt_oss":  # gate_up [E, H, 2I], gate/up interleaved
            ex.gate_up_proj[E0, K0, 2 * R0] = 3.0
            ex.gate_up_proj[E0, K0, 2 * R0 + 1] = 3.0
        else:  # gate_up [E, 2I, H], gate rows first
            inter = ex.gate_up_proj.shape[1] // 2
            ex.gate_up_proj[E0, R0, K0] = 3.0
            ex.gate_up_proj[E0, inter + R0, K0] = 3.0
        for row in range(hsize):  # R0 writes only into C0
            dp.set_down_weight(adapter, layer, E0, row, R0, 0.0)
        dp.set_down_weight(adapter, layer, E0, C0, R0, 2.0)
        model.get_output_embeddings().weight[:, C0] = _unigram_logp(rows, model.config.vocab_size) / math.sqrt(hsize)


def _save(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sw") / "w.jsonl", _rows())


FAST = dict(calib_items=24, diag_items=8, heldout_items=8, max_length=64, gen_prompts=1, gen_tokens=12, progress=False)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_down_proj_io_matches_family_forward(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers[-1]
    hidden = torch.randn(5, model.config.hidden_size)
    expert = 2
    act, out = dp.down_proj_io(adapter, layer, expert, hidden)
    ref = adapter.expert_outputs(layer, hidden, torch.full((5, 1), expert))[:, 0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert act.shape == (5, dp.intermediate_size(adapter, layer))
    # one scalar in the Linear convention: out[:, row] changes by -act[:, col] * W[row, col] when zeroed
    row, col = 4, 3
    w = dp.get_down_weight(adapter, layer, expert, row, col)
    assert w == float(dp.down_matrix(adapter, layer, expert)[row, col])
    with dp.down_weight_zeroed(adapter, layer, expert, row, col):
        _, out0 = dp.down_proj_io(adapter, layer, expert, hidden)
    torch.testing.assert_close(out - out0, torch.zeros_like(out).index_put_((torch.arange(5), torch.full((5,), row)), act[:, col] * w))
    assert dp.get_down_weight(adapter, layer, expert, row, col) == w
    name, index = dp.down_weight_index(adapter, layer, expert, row, col)
    assert name.endswith("experts.down_proj")
    assert index == ((expert, col, row) if family == "gpt_oss" else (expert, row, col))
    with pytest.raises(UspxError):
        dp.down_weight_index(adapter, layer, expert, 10_000, 0)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_energy_proxy_is_exact(family):
    """Proxy A is computed without a forward pass; it must equal the measured post-block energy."""
    from uspx.superweights.detect import _energy_proxy
    from uspx.superweights.passes import make_slice, run_pass
    from uspx.workload import EncodedItem

    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    items = [EncodedItem(i, str(i), "x", "calibration", torch.randint(2, 90, (10 + i,)).tolist(), 0) for i in range(4)]
    sl = make_slice("t", items, 2, 0)
    base = run_pass(model, adapter, sl, capture=(layer.index,), routing=True, inputs=True)
    expert = int(base.routing[layer.index][0, 0])
    row, col = 6, 2
    w = dp.get_down_weight(adapter, layer, expert, row, col)
    rel, e_base, e_abl, routed = _energy_proxy(adapter, layer, expert, row, col, w, base)
    with dp.down_weight_zeroed(adapter, layer, expert, row, col):
        abl = run_pass(model, adapter, sl, capture=(layer.index,))
    measured = float(abl.hidden[layer.index][routed, row].pow(2).mean())
    assert e_abl == pytest.approx(measured, rel=1e-4, abs=1e-7)
    assert e_base == pytest.approx(float(base.hidden[layer.index][routed, row].pow(2).mean()))


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_router_bias_pushes_tokens_to_expert(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    ids = torch.randint(2, 90, (2, 12))
    from uspx.trace.capture import RoutingRecorder

    def share(e: int) -> float:
        with torch.no_grad(), RoutingRecorder(adapter) as rec:
            model(input_ids=ids)
        return float((rec.layers[layer.index].index == e).any(1).double().mean())

    before = share(1)
    with dp.router_biased(adapter, layer, 1, 100.0):
        assert share(1) == 1.0
    assert share(1) == before  # restored


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_down_weight_dtype_comes_from_the_adapter_layer(family):
    """apply rounds a catalogued value to W_down's stored dtype, asked through uspx.models."""
    import importlib
    import inspect

    model = tiny_model(family, dtype=torch.bfloat16)
    adapter = adapter_for(model)
    for layer in adapter.layers:
        assert dp.down_weight_dtype(adapter, layer) == torch.bfloat16
    # the tensor layout stays inside uspx.models: apply names no expert tensor itself
    source = inspect.getsource(importlib.import_module("uspx.superweights.apply"))
    assert ".experts." not in source and "down_proj." not in source


def test_down_weight_dtype_refuses_unsupported_layouts():
    adapter = adapter_for(tiny_model("dbrx"))
    with pytest.raises(UspxError, match="dbrx"):
        dp.down_weight_dtype(adapter, adapter.layers[0])


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_planted_super_weight_found_ranked_first_and_hurts(family, workload, tmp_path):
    rows = _rows()
    model = tiny_model(family)
    _plant(model, rows)
    path = _save(model, tmp_path / "planted")
    cat = detect(path, workload, tmp_path / "sw", **FAST)
    assert cat["super_weights"], cat["verdict"]
    top = cat["super_weights"][0]
    assert (top["layer"], top["expert"], top["col_model"], top["row_ff"]) == (0, E0, C0, R0)
    assert top["rank"] == 1 and top["value"] == pytest.approx(2.0)
    assert top["p_active"] > 0.9
    assert top["proxy"]["energy"] < -0.5  # the channel's energy collapses when the scalar is zeroed
    assert top["I_nat"] > 0.5 and top["I_int"] > 0.5  # removal hurts, both ways of routing
    assert top["heldout_delta_loss"] > 0.5
    assert len(cat["super_weights"]) == 1
    # the expert holding it is a super expert, random experts are not
    sx = cat["super_experts"]
    assert {"layer": 0, "expert": E0} in sx["super_experts"]
    assert all(c["delta_loss"] < 0.5 for c in sx["control"])
    # routing statistics and checklist
    assert all(abs(r["p_active_sum"] - r["top_k"]) < 1e-6 for r in cat["routing"])
    assert all(r["capacity_overflow_rate"] == 0.0 for r in cat["routing"])
    status = {c["item"]: c["status"] for c in cat["checklist"]}
    assert status["sum_e p_active = K (top-K routing)"] == "pass"
    assert status["I_nat and I_int agree on sign and are non-trivial"] == "pass"
    assert status["held-out loss confirms the top candidates"] == "pass"
    assert status["iterative suppression reduces E_c* monotonically"] == "pass"
    assert (tmp_path / "sw" / "report.md").read_text().count("| 1 | 0 | 3 |") == 1
    on_disk = json.loads((tmp_path / "sw" / "superweights.json").read_text())
    assert on_disk["super_weights"][0]["storage_index"] == top["storage_index"]

    # apply: zero in a copy -> the loss rises as the catalogue says; restore -> identical logits
    zeroed = tmp_path / "zeroed"
    rec = apply(path, tmp_path / "sw" / "superweights.json", [0], "zero", zeroed)
    assert rec["entries"][0]["after"] == 0.0
    restored = tmp_path / "restored"
    run_cli(str(zeroed), str(workload), tmp_path / "sw", apply_restore="all", apply_out=restored, progress=False)
    ids = torch.tensor([make_tokenizer().encode("the cat sat on a mat.")])
    logits = {}
    for name, p in (("orig", path), ("zero", zeroed), ("back", restored)):
        m = load_model(p).model
        logits[name] = m(input_ids=ids).logits
        if name != "orig":
            a = adapter_for(m)
            v = dp.get_down_weight(a, a.layer(0), E0, C0, R0)
            assert v == (0.0 if name == "zero" else 2.0)
    torch.testing.assert_close(logits["back"], logits["orig"])
    assert not torch.allclose(logits["zero"], logits["orig"])


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_model_without_super_weight_yields_none(family, workload, tmp_path):
    path = _save(tiny_model(family, seed=1), tmp_path / "plain")
    cat = detect(path, workload, tmp_path / "sw", **FAST)
    assert cat["super_weights"] == []
    assert not cat["verdict"]["found"]
    assert "no super weight" in cat["verdict"]["summary"]
    assert cat["verdict"]["evidence"]["candidates_evaluated"] > 0
    assert "None. Evidence" in (tmp_path / "sw" / "report.md").read_text()


def test_options_are_checked(workload, tmp_path, tiny_gpt_oss_dir):
    with pytest.raises(UspxError, match="proxies"):
        run_cli(str(tiny_gpt_oss_dir), str(workload), tmp_path / "x", proxies="energy,ppl", progress=False)
    with pytest.raises(UspxError, match="co-spike-tau"):
        run_cli(str(tiny_gpt_oss_dir), str(workload), tmp_path / "x", co_spike_tau="high", progress=False)
    with pytest.raises(UspxError, match="score modes"):
        detect(tiny_gpt_oss_dir, workload, tmp_path / "x", score_modes=(), progress=False)
    with pytest.raises(UspxError, match="not both"):
        run_cli(str(tiny_gpt_oss_dir), str(workload), tmp_path / "x", apply_zero="all", apply_restore="all", progress=False)
