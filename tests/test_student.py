"""Dense students: the built MLP equals "these experts always on with these weights" (computed by
transformers' own expert modules), the student saves and reloads with stock transformers, the
routing statistics match a hand count, group lasso makes structured zeros, and ``uspx student``
runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.student.build import (ExpertChoice, RoutingStats, build_student, channel_groups, choose_experts,
                                group_lasso_step, group_norms)
from uspx.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

FAMILIES = ["gpt_oss", "qwen3_moe", "mixtral", "qwen2_moe", "olmoe"]


def _choice(adapter, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = {l.index: torch.randperm(l.num_experts, generator=g)[:m].tolist() for l in adapter.layers}
    weights = {l.index: (torch.rand(m, generator=g) + 0.1).tolist() for l in adapter.layers}
    return ExpertChoice(experts, weights, "routed")


@pytest.mark.parametrize("family", FAMILIES)
def test_student_layer_is_the_chosen_experts_always_on(family, one_thread):
    model = tiny_model(family)
    adapter = adapter_for(model)
    choice = _choice(adapter, 3)
    student = build_student(model, choice)
    s_adapter = adapter_for(student)
    assert s_adapter.num_experts == 1 and s_adapter.top_k == 1
    assert s_adapter.expert_width() == 3 * adapter.expert_width()
    x = torch.randn(17, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer, s_layer in zip(adapter.layers, s_adapter.layers):
        ids = torch.tensor(choice.experts[layer.index]).expand(17, -1)
        w = torch.tensor(choice.weights[layer.index]).expand(17, -1)
        with torch.no_grad():
            want = layer.experts(x, ids, w)  # transformers' own expert code, the M experts forced on
            got = s_layer.block(x.unsqueeze(0))
        got = (got[0] if isinstance(got, tuple) else got).reshape(17, -1)
        if family == "qwen2_moe":  # its block adds the shared expert, which the student keeps as it is
            with torch.no_grad():
                shared = layer.block.shared_expert(x) * torch.sigmoid(layer.block.shared_expert_gate(x))
            want = want + shared
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_student_other_tensors_are_the_originals_and_it_reloads(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt_oss")
    student = build_student(model, _choice(adapter_for(model), 2))
    for name, p in student.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(p, model.get_parameter(name)), name
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


def test_choose_experts_ranks_and_weights_by_hand():
    stats = RoutingStats(10, routed={0: np.array([0.1, 0.4, 0.2, 0.3])}, router={0: np.array([0.3, 0.2, 0.25, 0.25])})
    c = choose_experts({0: np.array([5.0, 1.0, 7.0, 3.0])}, stats, 2, "routed")
    assert c.experts == {0: [2, 0]} and c.weights == {0: [0.2, 0.1]}
    assert choose_experts({0: np.array([5.0, 1.0, 7.0, 3.0])}, stats, 2, "router").weights == {0: [0.25, 0.3]}
    with pytest.raises(UspxError, match="outside"):
        choose_experts({0: np.zeros(4)}, stats, 5)
    with pytest.raises(UspxError, match="weighting"):
        choose_experts({0: np.zeros(4)}, stats, 2, "mean")


def test_routing_stats_match_a_hand_count(one_thread):
    from uspx.student.build import routing_stats
    from uspx.workload import EncodedItem

    model = tiny_model("qwen3_moe")
    adapter = adapter_for(model)
    items = [EncodedItem(i, str(i), "f", "calibration", list(range(3 + i, 10 + 2 * i)), 0) for i in range(3)]
    stats = routing_stats(model, items)
    seen = {}
    layer = adapter.layers[0]
    hook = layer.router.register_forward_hook(lambda m, a, o: seen.setdefault("o", []).append(o))
    with torch.no_grad():
        for e in items:  # one item at a time, no padding
            model(input_ids=torch.tensor([e.input_ids]))
    hook.remove()
    logits = torch.cat([o[0] for o in seen["o"]])
    weights = torch.cat([o[1] for o in seen["o"]])
    index = torch.cat([o[2] for o in seen["o"]])
    routed = torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(0, index.reshape(-1), weights.reshape(-1).double())
    np.testing.assert_allclose(stats.routed[layer.index], (routed / len(logits)).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.router[layer.index], torch.softmax(logits.double(), -1).mean(0).numpy(), rtol=1e-5)


def test_group_lasso_step_zeroes_small_groups_exactly(one_thread):
    model = tiny_model("gpt_oss")
    student = build_student(model, _choice(adapter_for(model), 2))
    groups = channel_groups(student, 2)
    before = group_norms(groups)
    # hand check of one group's norm: the second block of layer 0's channels, every tensor holding them
    x = adapter_for(student).layers[0].experts
    width = adapter_for(student).expert_width()
    c = torch.arange(width // 2, width)
    gu = x.gate_up_proj[0][:, torch.cat([2 * c, 2 * c + 1])]
    bias = x.gate_up_proj_bias[0][torch.cat([2 * c, 2 * c + 1])]
    want = torch.sqrt(gu.pow(2).sum() + bias.pow(2).sum() + x.down_proj[0][c].pow(2).sum())
    torch.testing.assert_close(before[1], want.detach())
    strength = float(before.median())
    group_lasso_step(groups, strength)
    after = group_norms(groups)
    small = before <= strength
    assert small.any() and (after[small] == 0).all()
    torch.testing.assert_close(after[~small], before[~small] - strength)


ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code",
         "split": "heldout" if i >= 10 else "calibration"} for i in range(13)]


def test_uspx_student_end_to_end(tiny_gpt_oss_dir, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from conftest import write_jsonl
    from uspx.cli import app
    from uspx.extract import extract

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    extract(tiny_gpt_oss_dir, wl, tmp_path / "run", keep="50%", speed=False, progress=False)
    res = CliRunner().invoke(app, ["student", str(tmp_path / "run"), "-m", "2", "--steps", "4", "--generated", "0",
                                   "--group-lasso", "1e5", "--no-speed", "--others", str(wl)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "student-2" / "student.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student-2" / "model")  # stock loading
    assert model.config.num_local_experts == 1 and model.config.num_experts_per_tok == 1
    assert model.config.intermediate_size == 2 * 16
    assert report["history"]["step"] == 4
    assert set(report["heldout"]) == {"student (built, not trained)", "student", "pruned MoE"}
    # the student's experts are the run's two best per layer by its own scores
    from uspx.score.table import load_scores

    layers, values = load_scores(tmp_path / "run" / "scores").matrix("reconstruction")
    for l, row in zip(layers, values):
        assert set(report["experts"][str(l)]) == set(np.argsort(-row)[:2].tolist())
    z = report["group_lasso_zeros"]
    assert z["groups"] == 2 * 2 and z["zero"] == z["groups"]  # a strength past every block norm zeroes all
    sd = model.state_dict()
    zero_blocks = sum(int(sd[f"model.layers.{l}.mlp.experts.down_proj"][0, b * 16:(b + 1) * 16].abs().sum() == 0)
                      for l in range(2) for b in range(2))
    assert zero_blocks == z["zero"]  # the reported zeros are in the file
    # a family whose routing cannot express a dense student is refused before any work
    with pytest.raises(UspxError, match="outside|must lie"):
        from uspx.student import student

        student(tmp_path / "run", experts_per_layer=99, progress=False)


def test_plan_sizes_the_student_as_the_built_model(one_thread):
    """``uspx plan --student M``: weights and active parameters of the dense student equal those of
    the student model actually built (counted from its tensors)."""
    from uspx.plan.memory import student_estimate

    model = tiny_model("gpt_oss")
    student = build_student(model, _choice(adapter_for(model), 3))
    n = sum(p.numel() for p in student.parameters())
    st = student_estimate(model.config, 3, "fp32", context=16)
    assert st["dense_student"]["weights_bytes"] == 4 * n
    embedding = student.get_input_embeddings().weight.numel()  # a lookup, not computed (untied head)
    assert st["dense_student"]["active_params_per_token"] == n - embedding
    assert st["dense_student"]["kv_bytes"] == st["pruned_moe"]["kv_bytes"] > 0
