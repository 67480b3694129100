"""Learned expert masks (``uspx.score.masks``) and the "l0" score method."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny, write_jsonl
from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.plan import select_experts
from uspx.score.masks import gate, gate_open_probability, kept_from_log_alpha, learn_masks
from uspx.score import load_scores, score
from uspx.testing import tiny_model
from uspx.trace import trace
from uspx.workload import EncodedItem

from test_score import ROWS  # the same small workload

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def random_items(n: int, length: int, seed: int = 1) -> list[EncodedItem]:
    g = torch.Generator().manual_seed(seed)
    return [EncodedItem(i, str(i), "x", "calibration", torch.randint(2, 100, (length,), generator=g).tolist(), 0)
            for i in range(n)]


def routed_index(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The top-k index each router returns (hooks registered last, so they see any gating)."""
    adapter = adapter_for(model)
    seen, handles = {}, []
    for layer in adapter.layers:
        handles.append(layer.router.register_forward_hook(
            lambda m, a, out, i=layer.index: seen.__setitem__(i, out[2].reshape(-1, out[2].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx"])
def test_open_gates_leave_the_model_unchanged(one_thread, family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(2, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        ones = torch.ones(adapter.num_experts)
        with gate(model, {l.index: (lambda: ones) for l in adapter.layers}):
            got = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # the hooks are gone
    assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_closed_gate_is_never_routed(one_thread, family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(2, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    before = routed_index(model, ids)
    layer = adapter.layers[0]
    busiest = int(torch.bincount(before[layer.index].reshape(-1), minlength=layer.num_experts).argmax())
    z = torch.full((layer.num_experts,), 0.7)
    z[busiest] = 0.0
    with gate(model, {layer.index: lambda: z}):
        after = routed_index(model, ids)
    assert (before[layer.index] == busiest).any()  # the check means something
    assert not (after[layer.index] == busiest).any()
    assert after[layer.index].shape == before[layer.index].shape


def test_learned_masks_meet_the_budget(one_thread):
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    keep = 4
    log_alpha, history = learn_masks(model, random_items(8, 12), keep, steps=80, lr=0.1, lambda_lr=0.1,
                                     batch_size=4, progress=False)
    assert log_alpha.shape == (len(adapter.layers), adapter.num_experts)
    expected = gate_open_probability(log_alpha).sum(-1)
    assert (expected - keep).abs().max() < 1.0, expected
    kept = kept_from_log_alpha(log_alpha, [l.index for l in adapter.layers], keep)
    assert all(len(v) == keep for v in kept.values())
    assert history["kept"] == {str(l): v for l, v in kept.items()}
    assert len(history["kd"]) <= 50 and history["kd"][-1][0] == 80
    # the model is untouched and trainable flags are back
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    # seeded: the same run gives the same gates
    again, _ = learn_masks(model, random_items(8, 12), keep, steps=80, lr=0.1, lambda_lr=0.1, batch_size=4,
                           progress=False)
    assert torch.equal(again, log_alpha)


def test_learn_masks_refuses_budgets_below_top_k(one_thread):
    with pytest.raises(UspxError, match="top-k"):
        learn_masks(tiny_model("mixtral"), random_items(2, 8), 1, steps=1, progress=False)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    d = tmp_path_factory.mktemp("masks")
    model_dir = save_tiny("mixtral", d / "m")
    wl = write_jsonl(d / "w.jsonl", ROWS)
    trace(model_dir, wl, d / "t", progress=False)
    return d, model_dir, wl


def test_l0_scores_select_the_learned_kept_sets(one_thread, traced):
    d, model_dir, wl = traced
    table = score(model_dir, d / "t", wl, d / "s", ["frequency", "l0"], keep="50%", progress=False, batch_size=4)
    back = load_scores(d / "s")
    assert back.methods == ["frequency", "l0"]
    l0 = back.meta["options"]["l0"]
    assert l0["keep"] == 4 and len(l0["log_alpha"]) == 2 and len(l0["log_alpha"][0]) == 8
    df = back.to_pandas()
    rows = df[df.method == "l0"]
    assert len(rows) == 2 * 8 and rows.ci_low.isna().all() and rows.ci_high.isna().all()
    assert ((rows.value >= 0) & (rows.value <= 1)).all()
    freq = df[df.method == "frequency"]
    assert list(rows.tokens) == list(freq.tokens)  # routed counts of the trace
    plan = select_experts(table.method("l0"), keep="50%", config=model_dir)
    assert plan.kept_set() == {int(l): v for l, v in l0["history"]["kept"].items()}
    assert all(len(v) == 4 for v in plan.kept.values())


def test_l0_needs_keep(traced):
    d, model_dir, wl = traced
    with pytest.raises(UspxError, match="give keep"):
        score(model_dir, d / "t", wl, d / "s2", ["l0"], progress=False)


def test_cli_score_l0_then_select(one_thread, traced):
    import json

    from typer.testing import CliRunner

    from uspx.cli import app

    d, model_dir, wl = traced
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    res = run("score", model_dir, d / "t", wl, "-o", d / "cli_s", "--methods", "l0", "--keep", "50%",
              "--bootstrap", "0", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    res = run("select", d / "cli_s", "--model", model_dir, "-o", d / "plan.json", "--method", "l0", "--keep", "50%")
    assert res.exit_code == 0, res.output
    kept = json.loads((d / "plan.json").read_text())["kept"]
    assert kept == load_scores(d / "cli_s").meta["options"]["l0"]["history"]["kept"]
    res = run("score", model_dir, d / "t", wl, "-o", d / "cli_s2", "--methods", "l0")
    assert res.exit_code != 0 and "give keep" in str(res.exception) + res.output


def test_layer_masks_close_the_experts_the_router_never_chooses(tmp_path, one_thread):
    """Experts 1, 3, 4 and 6 of every layer get a router bias of -1e4: they are never routed, so
    removing them changes no block output, while removing any other does. Layer-local masks under
    keep 4 of 8 must close exactly those four, learned whole or layer by layer from the files."""
    from conftest import make_tokenizer
    from uspx.engine import open_source

    model = tiny_model("gpt_oss")
    never = [1, 3, 4, 6]
    with torch.no_grad():
        for layer in adapter_for(model).layers:
            layer.router.bias[never] = -1e4
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tmp_path / "m", wl, tmp_path / "t", progress=False)
    want = {l.index: sorted(set(range(8)) - set(never)) for l in adapter_for(model).layers}
    kept = {}
    for streaming in (False, True):
        out = tmp_path / f"s{int(streaming)}"
        model = open_source(tmp_path / "m", streaming=True, dtype="fp32") if streaming else tmp_path / "m"
        score(model, tmp_path / "t", wl, out, ["l0_layer"], keep="50%", progress=False, batch_size=4, dtype="fp32")
        meta = load_scores(out).meta["options"]["l0_layer"]
        kept[streaming] = {int(l): v for l, v in meta["history"]["kept"].items()}
        assert kept[streaming] == want
    assert load_scores(tmp_path / "s1").meta["options"]["streaming"]
