"""What a new user runs into: threads on every command that runs the model, one truncation length
everywhere, judging on another workload, a random baseline, per-item evaluation results, and plans
that name their score method."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from uspx.cli import app
from uspx.io import UspxError

ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code",
         "split": "heldout" if i >= 10 else "calibration"} for i in range(13)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_threads_option_sets_torch_threads_and_refuses_nonsense(tiny_gpt_oss_dir, tmp_path):
    old = torch.get_num_threads()
    try:
        wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
        res = invoke("trace", tiny_gpt_oss_dir, wl, "-o", tmp_path / "t", "--threads", 1)
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
        res = invoke("eval", tiny_gpt_oss_dir, wl, "--teacher", tiny_gpt_oss_dir, "-o", tmp_path / "e", "--threads", 0)
        assert isinstance(res.exception, UspxError) and "--threads must be >= 1" in str(res.exception)
    finally:
        torch.set_num_threads(old)


def test_one_truncation_length_for_every_command(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.evaluate import evaluate
    from uspx.trace import trace

    rows = [{"text": "x" * 700, "family": "long", "split": "heldout"},
            {"text": "y" * 40, "family": "long", "split": "calibration"}]
    wl = write_jsonl(tmp_path / "long.jsonl", rows)
    context = json.loads((tiny_gpt_oss_dir / "config.json").read_text())["max_position_embeddings"]
    want = min(512, context)  # 512, or the model's context when shorter
    ev = evaluate(tiny_gpt_oss_dir, None, wl, speed=False)
    tr = trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    assert ev["settings"]["max_length"] == want and tr["options"]["max_length"] == want
    assert ev["workload"]["truncated"] == 1
    res = invoke("workload", wl, "--model", tiny_gpt_oss_dir)
    assert res.exit_code == 0, res.output
    assert f"truncation to {want}" in res.output and "1 truncated" in res.output


def test_extract_judges_on_another_workload_with_per_item_results(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.models import load_model

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    other = write_jsonl(tmp_path / "o.jsonl", [{"prompt": f"x = {i}", "completion": f" + {i}", "family": "misc"}
                                               for i in range(3)])
    res = invoke("extract", tiny_gpt_oss_dir, wl, "-o", tmp_path / "run", "--keep", "50%", "--no-speed",
                 "--eval-workload", other, "--threads", 1)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ev = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert report["evaluated_on"]["split"] == "all" and ev["workload"]["source"].endswith("o.jsonl")
    assert ev["workload"]["items"] == 3 and len(ev["items"]) == 3 and set(ev["families"]) == {"misc"}
    # an item's teacher loss, computed by hand from the stock model
    lm = load_model(tiny_gpt_oss_dir)
    prompt = lm.tokenizer.encode("x = 1", add_special_tokens=False)
    full = prompt + lm.tokenizer.encode(" + 1", add_special_tokens=False)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([full])).logits[0]
    want = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(full[len(prompt):])).item()
    row = ev["items"][1]
    assert row["tokens"] == len(full) - len(prompt)
    assert row["loss_teacher"] == pytest.approx(want, rel=1e-4)


def test_select_random_baseline_and_plans_name_their_score_method(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.score import score
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s", ["frequency"], progress=False)
    plans = {}
    for name, extra in (("f", ["--method", "frequency"]), ("r1", ["--method", "random", "--seed", 1]),
                        ("r1b", ["--method", "random", "--seed", 1]), ("r2", ["--method", "random", "--seed", 2])):
        res = invoke("select", tmp_path / "s", "--model", tiny_gpt_oss_dir, "--keep", "50%", "-o",
                     tmp_path / f"{name}.json", *extra)
        assert res.exit_code == 0, res.output
        plans[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert plans["f"]["method"] == "frequency" and plans["f"]["solver"]["name"] == "uniform"
    assert plans["r1"]["method"] == "random" and plans["r1"]["kept"] == plans["r1b"]["kept"]
    assert plans["r1"]["kept"] != plans["r2"]["kept"]
    assert all(len(v) == 4 for v in plans["r1"]["kept"].values())


def test_cli_loads_the_model_once_per_run_and_checks_arguments_first(tiny_gpt_oss_dir, tmp_path, monkeypatch,
                                                                      one_thread):
    """`uspx extract` loads the original once and hands it to every stage (trace, score, export and
    its verification, evaluation); a typo in the arguments fails before any load."""
    import sys
    from pathlib import Path

    import uspx.models as models
    import uspx.prune  # noqa: F401
    from uspx.models.loading import resolve_model_path

    export_mod = sys.modules["uspx.prune.export"]  # the package's name `export` is the function

    src = Path(tiny_gpt_oss_dir).resolve()
    loads = []

    def counting(real):
        def load(model, *a, **k):
            if not isinstance(model, models.LoadedModel) and resolve_model_path(model).resolve() == src:
                loads.append(model)
            return real(model, *a, **k)
        return load

    monkeypatch.setattr(models, "load_model", counting(models.load_model))
    monkeypatch.setattr(export_mod, "load_model", counting(export_mod.load_model))
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    res = invoke("extract", tiny_gpt_oss_dir, wl, "-o", tmp_path / "bad", "--keep", "50%", "--method", "magic")
    assert "unknown score method 'magic'" in str(res.exception) and not loads
    res = invoke("score", tiny_gpt_oss_dir, tmp_path / "no-trace", wl, "-o", tmp_path / "s", "--methods", "magic")
    assert "unknown score method 'magic'" in str(res.exception) and not loads
    assert not (tmp_path / "bad").exists() and not (tmp_path / "s").exists()
    res = invoke("extract", tiny_gpt_oss_dir, wl, "-o", tmp_path / "run", "--keep", "50%", "--method", "frequency",
                 "--no-speed")
    assert res.exit_code == 0, res.output
    assert len(loads) == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["verification"]["max_abs_logit_diff"] <= 1e-4 and not report["streaming"]
