"""Virtual experts: the trigger labels and the detectors' intervals by hand, the probe and the
generation loop on the bundled teacher, and capability scores against a hand count of routing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from uspx.io import UspxError
from uspx.virtual.probe import TRIGGER, detection, token_labels, wilson


def test_trigger_labels_by_hand():
    text = "12 + 5 = 17\nx = 3\n40 * 2 ="
    ends = [2, 4, 6, 8, 11, 12, 13, 15, 17, 18, 21, 23, 25, 26]  # token ends at each character boundary we pick
    offsets = [(0, e) for e in ends]
    labels, regex = token_labels(text, offsets, positive_family=True)
    fired = [e for e, r in zip(ends, regex) if r]
    assert fired == [8, 26]  # after "12 + 5 =" and after "40 * 2 =", not after "x ="
    assert (labels == regex).all()
    labels, regex = token_labels(text, offsets, positive_family=False)
    assert not labels.any() and regex.sum() == 2
    assert TRIGGER.search("a = b =") is None


def test_detection_and_wilson_intervals():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)  # published values
    d = detection(np.array([True, True, False, True]), np.array([True, False, False, True]))
    assert (d.true_positive, d.false_positive, d.false_negative) == (2, 1, 0)
    assert d.precision == pytest.approx(2 / 3) and d.recall == 1.0


@pytest.fixture(scope="module")
def teacher_probe(one_thread):
    from uspx.models import load_model
    from uspx.virtual.probe import train_probe
    from uspx.workload import load_workload

    lm = load_model("default")
    probe, report = train_probe(lm.model, lm.tokenizer, load_workload("mixed"), steps=150)
    return lm, probe, report


def test_probe_detects_the_arithmetic_trigger_on_held_out_items(teacher_probe, tmp_path):
    from uspx.virtual.probe import Probe

    lm, probe, report = teacher_probe
    assert report["heldout_positives"] > 100
    assert report["probe"]["recall"] >= 0.9 and report["probe"]["precision"] >= 0.9
    assert report["probe"]["recall_ci"][0] <= report["probe"]["recall"] <= report["probe"]["recall_ci"][1]
    probe.save(tmp_path / "p")
    back = Probe.load(tmp_path / "p")
    h = torch.randn(5, lm.model.config.hidden_size)
    assert torch.equal(back.fires(h), probe.fires(h))


def test_generation_splices_the_calculators_exact_result(teacher_probe):
    from uspx.virtual.generate import generate_with_tools

    lm, probe, _ = teacher_probe
    g = generate_with_tools(lm.model, lm.tokenizer, "12 * 34 = 408\n987654 * 3210 =", probe, max_new_tokens=12)
    assert g.calls and g.calls[0].expression == "987654 * 3210" and g.calls[0].result == str(987654 * 3210)
    assert g.text.startswith(" " + str(987654 * 3210))
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for call in g.calls:  # every later line the model wrote was computed too (checked by a separate parser)
        m = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+)", call.expression)
        if m:
            assert call.result == str(ops[m.group(2)](int(m.group(1)), int(m.group(3))))
    code = generate_with_tools(lm.model, lm.tokenizer, "def add(a, b):\n    return", probe, max_new_tokens=12)
    assert code.calls == []


def test_capability_scores_count_routing_on_the_other_families(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.models import adapter_for, load_model
    from uspx.score import load_scores, score
    from uspx.trace import trace
    from uspx.workload import encode, load_workload

    rows = [{"prompt": f"{i} + {2 * i} =", "completion": f" {3 * i}", "family": "arith", "split": "calibration"}
            for i in range(5)]
    rows += [{"text": f"the cat number {i} sat on the mat", "family": "prose", "split": "calibration"} for i in range(5)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    with pytest.raises(UspxError, match="tool-families"):
        score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s0", ["capability"], progress=False)
    score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s", ["capability"], progress=False, tool_families=["arith"])
    table = load_scores(tmp_path / "s")
    layers, got = table.matrix("capability")
    # by hand: each prose token's top-k experts from the stock model's routers, over prose tokens
    lm = load_model(tiny_gpt_oss_dir)
    adapter = adapter_for(lm.model)
    counts = {fam: np.zeros((len(adapter.layers), adapter.num_experts)) for fam in ("arith", "prose")}
    tokens = {"arith": 0, "prose": 0}
    for item in encode(load_workload(wl), lm.tokenizer, 512):
        seen = {}
        hooks = [l.router.register_forward_hook(lambda m, a, o, i=l.index: seen.__setitem__(i, o[2]))
                 for l in adapter.layers]
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([item.input_ids]))
        for h in hooks:
            h.remove()
        tokens[item.family] += len(item.input_ids)
        for r, l in enumerate(adapter.layers):
            np.add.at(counts[item.family][r], seen[l.index].reshape(-1).numpy(), 1)
    np.testing.assert_allclose(got, counts["prose"] / tokens["prose"], rtol=1e-9)
    share = np.array(table.meta["options"]["capability"]["tool_share"])
    total = counts["arith"] + counts["prose"]
    np.testing.assert_allclose(share, np.where(total > 0, counts["arith"] / np.maximum(total, 1), 0), atol=1e-4)


def test_cli_generate_and_tool(teacher_probe, tmp_path):
    from typer.testing import CliRunner

    from uspx.cli import app

    _, probe, _ = teacher_probe
    probe.save(tmp_path / "p")
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    res = run("generate", "default", "40 * 25 =", "--probe", tmp_path / "p", "--max-new-tokens", 4)
    assert res.exit_code == 0, res.output
    assert "40 * 25 = 1000" in res.output and "tool calc: 40 * 25 = 1000" in res.output
    res = run("generate", "default", "hi", "--virtual-experts", "calc,units", "--probe", tmp_path / "p")
    assert isinstance(res.exception, UspxError) and "uspx tool" in str(res.exception)
    res = run("generate", "default", "hi")
    assert isinstance(res.exception, UspxError) and "--probe" in str(res.exception)
    res = run("tool", "calc", "7 / 2")
    assert res.exit_code == 0 and res.output.strip() == "7/2"
    res = run("tool", "python", "print(1)")
    assert isinstance(res.exception, UspxError) and "off" in str(res.exception)


def test_generate_refuses_a_probe_of_another_model(teacher_probe, tmp_path):
    from typer.testing import CliRunner

    from uspx.cli import app
    from uspx.io import FingerprintMismatch

    _, probe, _ = teacher_probe
    probe.save(tmp_path / "p", record=dict(model="0" * 64))
    res = CliRunner().invoke(app, ["generate", "default", "1 + 1 =", "--probe", str(tmp_path / "p")])
    assert isinstance(res.exception, FingerprintMismatch)
