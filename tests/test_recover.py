"""Recovery: the objectives against hand computation, the hard-concrete gates and the Lagrangian, and
``uspx recover`` end to end on a tiny model: it trains, exports a stock-loadable checkpoint, resumes
after a kill to the same weights, and refuses a folder of another run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from uspx.engine import open_source
from uspx.io import UspxError
from uspx.recover import Settings, recover
from uspx.recover.run import run_source
from uspx.recover.objectives import kd_loss, layer_loss, router_kd_loss
from uspx.score.masks import gate_open_probability, hard_concrete, lagrangian


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_loss_is_tau_squared_kl_on_a_tiny_vocabulary():
    t = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    s = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, -2.0]])
    tau = 2.0
    p, q = _softmax(t / tau), _softmax(s / tau)
    want = tau * tau * np.mean((p * np.log(p / q)).sum(-1))
    got = kd_loss(torch.tensor(s), torch.tensor(t), tau)
    assert abs(float(got) - want) < 1e-6
    assert float(kd_loss(torch.tensor(t), torch.tensor(t), tau)) == pytest.approx(0.0, abs=1e-7)


def test_router_kd_renormalises_the_original_over_the_kept_experts():
    teacher = np.array([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, 1.0, -2.0]])
    kept = [0, 2, 3]  # the pruned router's experts 0, 1, 2 are the original's 0, 2, 3
    student = np.array([[1.0, 0.0, 1.5], [0.3, 0.2, 0.1]])
    p, q = _softmax(teacher[:, kept]), _softmax(student)
    want = np.mean((p * np.log(p / q)).sum(-1))
    got = router_kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(kept))
    assert abs(float(got) - want) < 1e-6


def test_layer_loss_is_relative_mse():
    t = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    s = torch.tensor([[1.5, -2.0], [2.0, 1.0]])
    assert float(layer_loss(s, t)) == pytest.approx(((0.25 + 1 + 1) / 4) / ((1 + 4 + 9) / 4))


def test_hard_concrete_open_share_matches_its_expectation():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([hard_concrete(log_alpha, g) for _ in range(20000)])
    assert ((samples >= 0) & (samples <= 1)).all()
    empirical = (samples > 0).float().mean(0)
    # P(gate > 0) = P(s > -gamma / (zeta - gamma)) = sigmoid(log_alpha - beta * log(-gamma / zeta))
    want = 1 / (1 + torch.exp(-(log_alpha - (2 / 3) * math.log(0.1 / 1.1))))
    torch.testing.assert_close(gate_open_probability(log_alpha), want)
    torch.testing.assert_close(empirical, want, atol=0.01, rtol=0)


def test_lagrangian_pushes_the_expected_count_to_its_target():
    expected = torch.tensor(6.0, requires_grad=True)
    l1, l2 = torch.tensor(0.5, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    lagrangian(expected, 4.0, l1, l2).backward()
    assert expected.grad > 0  # descending on the gates lowers the count when above the target
    assert l1.grad == pytest.approx(2.0) and l2.grad == pytest.approx(4.0)  # ascending raises the penalty
    expected = torch.tensor(2.0, requires_grad=True)
    lagrangian(expected, 4.0, torch.tensor(0.5), torch.tensor(0.1)).backward()
    assert expected.grad > 0  # below the target with lambda_1 > 0: still pushed down until lambda_1 turns


def test_settings_refuse_nonsense():
    with pytest.raises(UspxError, match="--train"):
        Settings(train="everything")
    with pytest.raises(UspxError, match="nothing to train"):
        Settings(kd=0.0)


ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code",
         "split": "heldout" if i >= 10 else "calibration"} for i in range(13)]


@pytest.fixture
def run_dir(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.extract import extract

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    extract(tiny_gpt_oss_dir, wl, tmp_path / "run", keep="50%", speed=False, progress=False)
    return tmp_path / "run"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_recover_trains_exports_and_resumes_to_the_same_weights(run_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import uspx.recover.train as train_mod

    settings = Settings(steps=6, batch_size=4, eval_every=2, checkpoint_every=2, patience=10, lr=1e-3,
                        router_kd=0.5, layer=0.5, ce=0.1, generated=1, generated_tokens=5)
    ref = recover(run_dir, settings=settings, out_dir=tmp_path / "a", others=run_dir / ".." / "w.jsonl", progress=False)
    assert ref["history"]["step"] == 6 and ref["history"]["tokens_seen"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")  # stock loading
    assert model.config.num_local_experts == 4
    record = json.loads((tmp_path / "a" / "model" / "uspx_export.json").read_text())
    assert record["recovered"]["history"]["step"] == 6 and record["verification"]["max_abs_logit_diff"] <= 1e-4
    assert ref["calibration"]["after"]["all"]["delta"] < ref["calibration"]["before"]["all"]["delta"]

    real = train_mod._checkpoint

    def killed_at_step_4(work, key, history, *a):
        real(work, key, history, *a)
        if history.step == 4:
            raise KeyboardInterrupt  # as if killed right after the checkpoint of step 4

    monkeypatch.setattr(train_mod, "_checkpoint", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        recover(run_dir, settings=settings, out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "model").exists()
    monkeypatch.setattr(train_mod, "_checkpoint", real)
    resumed = recover(run_dir, settings=settings, out_dir=tmp_path / "b", others=run_dir / ".." / "w.jsonl",
                      progress=False)
    assert resumed["history"]["train_loss"] == ref["history"]["train_loss"]
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # another plan's (or setting's) recovery folder is refused, not overwritten
    with pytest.raises(UspxError, match="another plan, model or settings"):
        recover(run_dir, settings=Settings(steps=3, batch_size=4), out_dir=tmp_path / "b", progress=False)
    assert all(torch.equal(a[k], _weights(tmp_path / "b" / "model")[k]) for k in a)


def test_lora_recovery_is_merged_into_a_stock_checkpoint(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    r = recover(run_dir, settings=Settings(train="lora", steps=3, batch_size=4, lr=1e-2, lora_rank=2),
                out_dir=tmp_path / "l", others=run_dir / ".." / "w.jsonl", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "l" / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged, no adapter left
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, pruned.get_parameter(n))]
    assert any("experts" in n for n in changed) and any("q_proj" in n for n in changed)
    assert r["history"]["step"] == 3


def test_recover_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UspxError, match="not a finished"):
        recover(tmp_path, progress=False)


def test_extract_recover_judges_the_recovered_model(tiny_gpt_oss_dir, tmp_path, one_thread):
    from typer.testing import CliRunner

    from uspx.cli import app

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    res = CliRunner().invoke(app, ["extract", str(tiny_gpt_oss_dir), str(wl), "-o", str(tmp_path / "run"), "--keep", "50%",
                                   "--no-speed", "--recover", "--recover-steps", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rec = json.loads((tmp_path / "run" / "recover" / "recover.json").read_text())
    assert report["acceptance"] == rec["acceptance"] and report["recovered"]["history"]["step"] == 2
    res = CliRunner().invoke(app, ["recover", str(tmp_path / "run"), "--steps", "2", "--train", "nonsense"])
    assert isinstance(res.exception, UspxError) and "--train must be one of" in str(res.exception)


def test_generated_items_continue_the_users_prompts(tiny_gpt_oss_dir, tmp_path):
    from uspx.models import load_model
    from uspx.recover.train import generated_items
    from uspx.workload import encode, load_workload

    lm = load_model(tiny_gpt_oss_dir)
    items = encode(load_workload(write_jsonl(tmp_path / "w.jsonl", ROWS)).part("calibration"), lm.tokenizer, 256)
    settings = Settings(generated=2, generated_tokens=5)
    gen = generated_items(lm.model, items, settings, tmp_path / "g.json")
    assert len(gen) == 2 * len(items)
    for g in gen:
        item = next(i for i in items if i.index == g.index)
        assert g.input_ids[: g.completion_start] == item.input_ids[: item.completion_start]  # the user's prompt
        assert 1 <= len(g.input_ids) - g.completion_start <= 5 and g.split == "generated"
    # cached: a resumed run trains on the same items
    again = generated_items(lm.model, items, Settings(generated=2, generated_tokens=5, seed=9), tmp_path / "g.json")
    assert again == gen


def _layer0_objective(teacher, student, kept0, items):
    """Router KD plus layer matching at MoE layer 0 of two stock-loaded models, item by item: both see
    the same layer-0 inputs, so this is what layer-by-layer training minimises there."""
    from uspx.models import adapter_for

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    total = 0.0
    for ids in items:
        seen = {}
        for name, model in (("t", teacher), ("s", student)):
            layer = adapter_for(model).layers[0]
            hooks = [layer.router.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n + "r", first(o))),
                     layer.block.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n + "b", first(o)))]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            for h in hooks:
                h.remove()
        n = len(ids)
        total += n * float(router_kd_loss(seen["sr"].reshape(n, -1), seen["tr"].reshape(n, -1), torch.tensor(kept0))
                           + layer_loss(seen["sb"].reshape(n, -1), seen["tb"].reshape(n, -1)))
    return total


def test_layer_by_layer_router_recovery_trains_only_routers_and_resumes(run_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import uspx.recover.layers as layers_mod
    from uspx.models import load_model
    from uspx.workload import encode, load_workload

    wl = run_dir / ".." / "w.jsonl"
    settings = Settings(train="router", steps=12, eval_every=3, patience=10, batch_size=4)
    layered = lambda: open_source(run_source(run_dir), streaming=True, dtype="fp32")  # noqa: E731
    ref = recover(run_dir, original=layered(), settings=settings, dtype="fp32", out_dir=tmp_path / "a", others=wl,
                  progress=False)
    assert ref["streaming"] and len(ref["history"]["layers"]) == 2 and ref["history"]["peak_rss_bytes"] > 0
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")  # stock loading
    changed = {n for n, p in recovered.named_parameters() if not torch.equal(p, pruned.get_parameter(n))}
    assert changed and all(".router." in n for n in changed)

    record = json.loads((run_dir / "model" / "uspx_export.json").read_text())
    teacher = load_model(record["source"])
    items = encode(load_workload(wl).part("calibration"), teacher.tokenizer, 64)
    ids, kept0 = [e.input_ids for e in items], record["kept"]["0"]
    assert _layer0_objective(teacher.model, recovered, kept0, ids) < _layer0_objective(teacher.model, pruned, kept0, ids)

    real = layers_mod._save

    def killed_after_layer_2(work, key, history, *a):
        real(work, key, history, *a)
        if history.layers_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(layers_mod, "_save", killed_after_layer_2)
    with pytest.raises(KeyboardInterrupt):
        recover(run_dir, original=layered(), settings=settings, dtype="fp32", out_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(layers_mod, "_save", real)
    again = recover(run_dir, original=layered(), settings=settings, dtype="fp32", out_dir=tmp_path / "b", others=wl,
                    progress=False)
    assert [r["val_after"] for r in again["history"]["layers"]] == [r["val_after"] for r in ref["history"]["layers"]]
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(UspxError, match="LoRA needs the whole model"):
        recover(run_dir, original=layered(), settings=Settings(train="lora"), out_dir=tmp_path / "c", progress=False)


def test_layer_by_layer_full_recovery_trains_every_kept_weight_towards_the_original(run_dir, tmp_path):
    """Each pruned layer learns the original layer's output on its own stream: after training, the
    pruned model's hidden states after every layer are closer to the original's (transformers'
    own forwards of the exported checkpoints, measured independently of the trainer)."""
    from transformers import AutoModelForCausalLM

    from uspx.models import load_model
    from uspx.workload import encode, load_workload

    wl = run_dir / ".." / "w.jsonl"
    settings = Settings(train="full", steps=30, eval_every=5, patience=10, batch_size=4, lr=1e-3, generated=0)
    res = recover(run_dir, original=open_source(run_source(run_dir), streaming=True, dtype="fp32"),
                  settings=settings, dtype="fp32", out_dir=tmp_path / "f", others=wl, progress=False)
    assert res["streaming"] and res["settings"]["train"] == "full"
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "f" / "model")  # stock loading
    changed = {n for n, p in recovered.named_parameters() if not torch.equal(p, pruned.get_parameter(n))}
    assert any(".self_attn." in n for n in changed) and any(".experts." in n for n in changed)

    record = json.loads((run_dir / "model" / "uspx_export.json").read_text())
    teacher = load_model(record["source"])
    items = encode(load_workload(wl).part("calibration"), teacher.tokenizer, 64)

    def distance(model) -> list[float]:
        """Per decoder layer: relative squared distance of its output from the original's."""
        sums = None
        with torch.no_grad():
            for e in items:
                ids = torch.tensor([e.input_ids])
                want = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[1:-1]
                got = model(input_ids=ids, output_hidden_states=True).hidden_states[1:-1]
                d = [float((g - w).pow(2).sum() / w.pow(2).sum()) for g, w in zip(got, want)]
                sums = d if sums is None else [a + b for a, b in zip(sums, d)]
        return sums

    before, after = distance(pruned), distance(recovered)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_mxfp4_recovery_keeps_the_expert_blocks_byte_for_byte(tmp_path, one_thread):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from conftest import make_tokenizer
    from uspx.extract import extract
    from uspx.models.synthetic import write_gpt_oss

    src = write_gpt_oss(tmp_path / "mx", "tiny")
    make_tokenizer().save_pretrained(src)
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    extract(src, wl, tmp_path / "run", keep="50%", speed=False, progress=False)
    recover(tmp_path / "run", settings=Settings(steps=3, batch_size=4, generated=0), others=wl, progress=False)
    before = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "recover" / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    quantized = [k for k in before if k.endswith(("_blocks", "_scales"))]
    assert quantized and all(torch.equal(before[k], after[k]) for k in quantized)
    assert any(not torch.equal(before[k], after[k]) for k in before if "q_proj" in k)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "recover" / "model",
                                                 quantization_config=Mxfp4Config(dequantize=True))
    assert model.config.num_local_experts == 4
